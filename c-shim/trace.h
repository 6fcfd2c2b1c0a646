#include "trace/trace-hw_pyemb.h"
