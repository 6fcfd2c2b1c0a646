/*
 * pyemb: the embedded CPython interpreter
 *
 * One interpreter per QEMU process, started when the first pyemb device is
 * realized (after QEMU has parsed its options and daemonized), shared by all
 * pyemb devices and finalized at exit.  The interpreter is the Python of the
 * project's virtual environment: $PYEMB_VENV if set, else the "venv=" line
 * of pyemb.conf next to the QEMU binary, which ci/build-qemu.sh writes.
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "pyemb-internal.h"
#include "qapi/error.h"
#include "qemu/error-report.h"
#include "qemu/cutils.h"
#include "qemu/main-loop.h"
#include <dlfcn.h>

static enum { PY_NOT_STARTED, PY_RUNNING, PY_FAILED, PY_FINALIZED } py_state;
static char *py_start_error;

/*
 * Each thread that enters Python keeps one thread state for its lifetime:
 * building a new one on every entry (what PyGILState_Ensure/Release do for
 * a thread without one) costs about 6 us; reusing it costs 0.1 to 0.35 us.
 */
static __thread PyThreadState *thread_pystate;

static QTAILQ_HEAD(, VirtIOPyemb) pyemb_devices =
    QTAILQ_HEAD_INITIALIZER(pyemb_devices);

bool pyemb_python_running(void)
{
    return py_state == PY_RUNNING;
}

bool pyemb_gil_acquire(void)
{
    if (PyGILState_Check()) {
        return false;
    }
    if (!thread_pystate) {
        /* Binds a new thread state to this thread and takes the GIL. */
        PyGILState_Ensure();
        thread_pystate = PyThreadState_Get();
        return true;
    }
    PyEval_RestoreThread(thread_pystate);
    return true;
}

void pyemb_gil_release(bool acquired)
{
    if (acquired) {
        PyEval_SaveThread();
    }
}

/* The pending exception as "Type: message", consuming it. */
char *pyemb_exception_line(void)
{
    PyObject *exc, *value, *tb;
    PyObject *type_name = NULL, *text = NULL;
    char *line;

    PyErr_Fetch(&exc, &value, &tb);
    if (!exc) {
        return g_strdup("unknown error");
    }
    PyErr_NormalizeException(&exc, &value, &tb);
    type_name = PyObject_GetAttrString(exc, "__name__");
    text = value ? PyObject_Str(value) : NULL;
    if (type_name && text &&
        g_str_equal(PyUnicode_AsUTF8(type_name), "ConfigError")) {
        /* pyemb.ConfigError carries a complete, user-facing sentence. */
        line = g_strdup(PyUnicode_AsUTF8(text));
    } else if (type_name && text && PyUnicode_GetLength(text) > 0) {
        line = g_strdup_printf("%s: %s", PyUnicode_AsUTF8(type_name),
                               PyUnicode_AsUTF8(text));
    } else if (type_name) {
        line = g_strdup(PyUnicode_AsUTF8(type_name));
    } else {
        line = g_strdup("unprintable Python exception");
    }
    PyErr_Clear();
    Py_XDECREF(type_name);
    Py_XDECREF(text);
    Py_XDECREF(exc);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return line;
}

/*
 * Log the pending Python exception with its traceback through QEMU's error
 * reporting, and clear it.  GIL held.
 */
void pyemb_report_exception(const char *who, const char *what)
{
    PyObject *exc, *value, *tb;
    PyObject *traceback = NULL, *lines = NULL, *joined = NULL, *empty = NULL;

    PyErr_Fetch(&exc, &value, &tb);
    if (!exc) {
        return;
    }
    PyErr_NormalizeException(&exc, &value, &tb);
    traceback = PyImport_ImportModule("traceback");
    if (traceback) {
        lines = PyObject_CallMethod(traceback, "format_exception", "OOO",
                                    exc, value ? value : Py_None,
                                    tb ? tb : Py_None);
    }
    if (lines) {
        empty = PyUnicode_FromString("");
        joined = empty ? PyUnicode_Join(empty, lines) : NULL;
    }
    error_report("%s: Python exception while %s", who, what);
    if (joined) {
        error_printf("%s", PyUnicode_AsUTF8(joined));
    }
    PyErr_Clear();
    Py_XDECREF(traceback);
    Py_XDECREF(lines);
    Py_XDECREF(joined);
    Py_XDECREF(empty);
    Py_XDECREF(exc);
    Py_XDECREF(value);
    Py_XDECREF(tb);
}

/*
 * QEMU loads modules with local symbol binding, so libpython arrives as a
 * local dependency of hw-pyemb-devices.so; extension modules (PyAV's, for
 * one) resolve Python's API in the global namespace.  Promote it.
 */
static bool pyemb_make_libpython_global(Error **errp)
{
    Dl_info info;

    if (!dladdr((void *)Py_InitializeFromConfig, &info) || !info.dli_fname ||
        !dlopen(info.dli_fname, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD)) {
        error_setg(errp, "pyemb: cannot make libpython's symbols global: %s",
                   dlerror());
        return false;
    }
    return true;
}

/* The venv to embed: $PYEMB_VENV, else pyemb.conf beside the binary. */
static char *pyemb_find_venv(Error **errp)
{
    const char *env = g_getenv("PYEMB_VENV");
    g_autofree char *exe = NULL, *dir = NULL, *conf = NULL, *text = NULL;
    g_auto(GStrv) lines = NULL;

    if (env && *env) {
        return g_strdup(env);
    }
    exe = g_file_read_link("/proc/self/exe", NULL);
    if (!exe) {
        error_setg(errp, "pyemb: cannot find the QEMU binary to locate "
                   "pyemb.conf; set PYEMB_VENV to the project's venv");
        return NULL;
    }
    dir = g_path_get_dirname(exe);
    conf = g_build_filename(dir, "pyemb.conf", NULL);
    if (!g_file_get_contents(conf, &text, NULL, NULL)) {
        error_setg(errp, "pyemb: %s is missing; run ci/build-qemu.sh or set "
                   "PYEMB_VENV to the project's virtual environment", conf);
        return NULL;
    }
    lines = g_strsplit(text, "\n", -1);
    for (char **l = lines; *l; l++) {
        if (g_str_has_prefix(*l, "venv=")) {
            return g_strdup(g_strstrip(*l + strlen("venv=")));
        }
    }
    error_setg(errp, "pyemb: %s has no venv= line", conf);
    return NULL;
}

/* The venv's Python must be the one whose libpython this QEMU embeds. */
static bool pyemb_check_venv(const char *venv, Error **errp)
{
    g_autofree char *cfg = g_build_filename(venv, "pyvenv.cfg", NULL);
    g_autofree char *text = NULL;
    g_autofree char *want = g_strdup_printf("%d.%d", PY_MAJOR_VERSION,
                                            PY_MINOR_VERSION);
    g_auto(GStrv) lines = NULL;

    if (!g_file_get_contents(cfg, &text, NULL, NULL)) {
        error_setg(errp, "pyemb: %s is not a Python virtual environment "
                   "(no pyvenv.cfg); run 'make setup' or fix PYEMB_VENV",
                   venv);
        return false;
    }
    lines = g_strsplit(text, "\n", -1);
    for (char **l = lines; *l; l++) {
        g_auto(GStrv) kv = g_strsplit(*l, "=", 2);
        if (kv[0] && kv[1] && g_str_equal(g_strstrip(kv[0]), "version")) {
            const char *have = g_strstrip(kv[1]);
            if (!g_str_has_prefix(have, want) ||
                (have[strlen(want)] != '.' && have[strlen(want)] != '\0')) {
                error_setg(errp, "pyemb: %s is Python %s but this QEMU "
                           "embeds libpython %s; recreate the venv with "
                           "python%s", venv, have, want, want);
                return false;
            }
            return true;
        }
    }
    error_setg(errp, "pyemb: %s has no version line", cfg);
    return false;
}

/* Run the checks of pyemb.host.check_environment(venv). */
static bool pyemb_check_site(const char *venv, Error **errp)
{
    PyObject *host = PyImport_ImportModule("pyemb.host");
    PyObject *ok;

    if (!host) {
        g_autofree char *line = pyemb_exception_line();
        error_setg(errp, "pyemb: the embedded Python (prefix %s) cannot "
                   "import pyemb (%s); is pyemb installed in that venv?",
                   venv, line);
        return false;
    }
    ok = PyObject_CallMethod(host, "check_environment", "s", venv);
    Py_DECREF(host);
    if (!ok) {
        g_autofree char *line = pyemb_exception_line();
        error_setg(errp, "pyemb: %s", line);
        return false;
    }
    Py_DECREF(ok);
    return true;
}

static void pyemb_python_shutdown(void)
{
    VirtIOPyemb *s;
    PyObject *host, *res;
    bool clean = false;

    if (py_state != PY_RUNNING) {
        return;
    }
    py_state = PY_FINALIZED;
    pyemb_gil_acquire();
    /* Devices are not unrealized at exit: drop their Python objects here. */
    QTAILQ_FOREACH(s, &pyemb_devices, next) {
        if (s->model) {
            s->dropping = true;
            res = PyObject_CallMethod(s->model, "close", NULL);
            if (!res) {
                pyemb_report_exception(object_get_typename(OBJECT(s)),
                                       "closing the device model at exit");
            }
            Py_XDECREF(res);
        }
        pyemb_device_handle_detach(s->handle);
        Py_CLEAR(s->dispatch);
        Py_CLEAR(s->model);
        Py_CLEAR(s->handle);
    }
    /* Bounded join of backend threads; a hung thread must not hang exit. */
    host = PyImport_ImportModule("pyemb.host");
    res = host ? PyObject_CallMethod(host, "shutdown", "d", 2.0) : NULL;
    if (res) {
        clean = PyObject_IsTrue(res) == 1;
    } else {
        pyemb_report_exception("pyemb", "shutting down");
    }
    Py_XDECREF(res);
    Py_XDECREF(host);
    if (!clean) {
        warn_report("pyemb: Python threads still running at exit; "
                    "skipping interpreter finalization");
        PyEval_SaveThread();
        return;
    }
    if (Py_FinalizeEx() < 0) {
        warn_report("pyemb: errors while finalizing the Python interpreter");
    }
    thread_pystate = NULL;
}

bool pyemb_python_start(Error **errp)
{
    g_autofree char *venv = NULL;
    g_autofree char *program = NULL;
    PyConfig config;
    PyStatus status;

    if (py_state == PY_RUNNING) {
        return true;
    }
    if (py_state != PY_NOT_STARTED) {
        error_setg(errp, "%s", py_start_error ? py_start_error :
                   "pyemb: the Python interpreter has been shut down");
        return false;
    }

    venv = pyemb_find_venv(errp);
    if (!venv || !pyemb_check_venv(venv, errp)) {
        goto fail;
    }
    program = g_build_filename(venv, "bin", "python3", NULL);
    if (!pyemb_make_libpython_global(errp)) {
        goto fail;
    }

    if (PyImport_AppendInittab("_pyemb", pyemb_module_init) < 0) {
        error_setg(errp, "pyemb: cannot register the _pyemb module");
        goto fail;
    }
    PyConfig_InitPythonConfig(&config);
    /* QEMU owns SIGINT, SIGTERM and the signals that kick vCPU threads. */
    config.install_signal_handlers = 0;
    config.parse_argv = 0;
    status = PyConfig_SetBytesString(&config, &config.program_name, program);
    if (!PyStatus_Exception(status)) {
        status = Py_InitializeFromConfig(&config);
    }
    PyConfig_Clear(&config);
    if (PyStatus_Exception(status)) {
        error_setg(errp, "pyemb: cannot start Python from %s: %s", venv,
                   status.err_msg ? status.err_msg : "unknown error");
        goto fail;
    }
    thread_pystate = PyThreadState_Get();

    if (!pyemb_check_site(venv, errp)) {
        /* A started interpreter cannot be restarted: keep it, report. */
        PyEval_SaveThread();
        goto fail;
    }
    py_state = PY_RUNNING;
    atexit(pyemb_python_shutdown);
    /* Python worker threads and PortAudio callbacks need the GIL free. */
    PyEval_SaveThread();
    return true;

fail:
    py_state = PY_FAILED;
    if (errp && *errp) {
        py_start_error = g_strdup(error_get_pretty(*errp));
    }
    return false;
}

void pyemb_register_device(VirtIOPyemb *s)
{
    QTAILQ_INSERT_TAIL(&pyemb_devices, s, next);
}

void pyemb_unregister_device(VirtIOPyemb *s)
{
    QTAILQ_REMOVE(&pyemb_devices, s, next);
}
