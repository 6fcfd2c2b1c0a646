/*
 * pyemb: the _pyemb extension module seen by the Python device models
 *
 *   _pyemb.Request       one popped virtqueue element; its readable and
 *                        writable parts are memoryviews straight over guest
 *                        RAM, dead (ValueError) once the request completes
 *   _pyemb.GuestMapping  a long-lived mapping of guest RAM (virtio-video
 *                        resources), bounds-checked, unmapped on release()
 *   _pyemb.Device        the handle a device model gets: map_guest(),
 *                        notify_config(), batch(), shared_memory,
 *                        discard_shared_memory()
 *   log_error(), log_warning()   QEMU's error reporting
 *
 * Every function here runs with the GIL held.  Functions that touch virtio
 * state check bql_locked() and, called from a thread that does not hold
 * the BQL, defer to a bottom half or to the end of the thread's completion
 * batch.
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "pyemb-internal.h"
#include <structmember.h>
#include "qemu/error-report.h"
#include "qemu/main-loop.h"
#include "qemu/rcu.h"
#include "exec/memory.h"
#include "system/dma.h"
#include "trace.h"

/*
 * GuestRegion: the buffer exporter behind every memoryview over guest
 * memory.  It counts exports, so that views a model keeps (slices,
 * numpy arrays) after completion can be reported, and refuses new exports
 * once invalidated.
 */
typedef struct PyembRegion {
    PyObject_HEAD
    void *ptr;
    Py_ssize_t len;
    bool readonly;
    bool valid;
    Py_ssize_t exports;
    PyembShm *shm;              /* a reference to the memory, or NULL */
    /*
     * A guest mapping released while something derived from its view was
     * still exported (a stream worker's conversion reading or writing
     * through it as a reset released every mapping): unmapped when the
     * last export goes, so the memory stays mapped while it is used.
     * unmap_dev is NULL unless such an unmap waits (on its list).
     */
    VirtIOPyemb *unmap_dev;
    bool unmap_writable;
    QTAILQ_ENTRY(PyembRegion) deferred_next;
} GuestRegion;

static void guest_region_unmap(GuestRegion *r);

static int guest_region_getbuffer(PyObject *obj, Py_buffer *view, int flags)
{
    GuestRegion *r = (GuestRegion *)obj;

    if (!r->valid) {
        PyErr_SetString(PyExc_ValueError,
                        "guest memory used after its request completed or "
                        "its mapping was released");
        view->obj = NULL;
        return -1;
    }
    if (PyBuffer_FillInfo(view, obj, r->ptr, r->len, r->readonly, flags) < 0) {
        return -1;
    }
    r->exports++;
    return 0;
}

static void guest_region_releasebuffer(PyObject *obj, Py_buffer *view)
{
    GuestRegion *r = (GuestRegion *)obj;

    if (--r->exports == 0 && r->unmap_dev) {
        guest_region_unmap(r);
    }
}

static void guest_region_dealloc(PyObject *obj)
{
    GuestRegion *r = (GuestRegion *)obj;

    if (r->shm) {
        pyemb_shm_unref(r->shm);
    }
    PyObject_Free(obj);
}

static PyBufferProcs guest_region_as_buffer = {
    .bf_getbuffer = guest_region_getbuffer,
    .bf_releasebuffer = guest_region_releasebuffer,
};

static PyTypeObject GuestRegionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "_pyemb.GuestRegion",
    .tp_basicsize = sizeof(GuestRegion),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = guest_region_dealloc,
    .tp_as_buffer = &guest_region_as_buffer,
    .tp_doc = "Guest memory behind a memoryview (internal).",
};

/* A memoryview over host pointer @ptr; *region receives its exporter. */
static PyObject *guest_view_new(void *ptr, size_t len, bool readonly,
                                PyObject **region)
{
    GuestRegion *r = PyObject_New(GuestRegion, &GuestRegionType);
    PyObject *view;

    if (!r) {
        return NULL;
    }
    r->ptr = ptr;
    r->len = len;
    r->readonly = readonly;
    r->valid = true;
    r->exports = 0;
    r->shm = NULL;
    r->unmap_dev = NULL;
    view = PyMemoryView_FromObject((PyObject *)r);
    if (!view) {
        Py_DECREF(r);
        return NULL;
    }
    *region = (PyObject *)r;
    return view;
}

/*
 * Kill a view (if any) and its exporter.  Returns true if something derived
 * from the view (a slice, a cast, a numpy array) is still alive: CPython
 * gives no way to revoke those, so they are reported instead.
 */
static bool guest_view_invalidate(PyObject *view, PyObject *region)
{
    GuestRegion *r = (GuestRegion *)region;
    PyObject *res = view ? PyObject_CallMethod(view, "release", NULL) : NULL;

    if (view && !res) {
        PyErr_Clear();  /* BufferError: the view itself is exported */
    }
    Py_XDECREF(res);
    r->valid = false;
    return r->exports > 0;
}

/* Python 3.11's PyErr_Format() knows no %llx: GLib formats instead. */
static void G_GNUC_PRINTF(1, 2) value_error(const char *fmt, ...)
{
    g_autofree char *msg = NULL;
    va_list va;

    va_start(va, fmt);
    msg = g_strdup_vprintf(fmt, va);
    va_end(va);
    PyErr_SetString(PyExc_ValueError, msg);
}

static void warn_kept_views(VirtIOPyemb *s, const char *what)
{
    if (s && !s->warned_kept_views) {
        s->warned_kept_views = true;
        warn_report("%s: the device model keeps views of guest memory after "
                    "%s; they are stale (reported once per device)",
                    object_get_typename(OBJECT(s)), what);
    }
}

/* ---- Request ---------------------------------------------------------- */

static PyTypeObject RequestType;

static PyObject *views_of(struct iovec *sg, unsigned num, bool readonly,
                          PyObject *regions, Py_ssize_t *region_at,
                          size_t *total)
{
    PyObject *views = PyTuple_New(num);

    if (!views) {
        return NULL;
    }
    *total = 0;
    for (unsigned i = 0; i < num; i++) {
        PyObject *region;
        PyObject *view = guest_view_new(sg[i].iov_base, sg[i].iov_len,
                                        readonly, &region);
        if (!view) {
            Py_DECREF(views);
            return NULL;
        }
        PyTuple_SET_ITEM(views, i, view);
        PyTuple_SET_ITEM(regions, (*region_at)++, region);
        *total += sg[i].iov_len;
    }
    return views;
}

PyObject *pyemb_request_new(VirtIOPyemb *s, unsigned queue_index,
                            VirtQueueElement *elem)
{
    PyembRequest *req = PyObject_New(PyembRequest, &RequestType);
    Py_ssize_t at = 0;

    if (!req) {
        return NULL;
    }
    req->dev = NULL;
    req->elem = elem;
    req->queue_index = queue_index;
    req->finished = false;
    req->cancelled = false;
    req->readable = req->writable = NULL;
    req->regions = PyTuple_New(elem->out_num + elem->in_num);
    if (req->regions) {
        req->readable = views_of(elem->out_sg, elem->out_num, true,
                                 req->regions, &at, &req->readable_size);
    }
    if (req->readable) {
        req->writable = views_of(elem->in_sg, elem->in_num, false,
                                 req->regions, &at, &req->writable_size);
    }
    if (!req->writable) {
        req->elem = NULL;       /* the caller still owns elem */
        req->finished = true;
        Py_DECREF(req);
        return NULL;
    }
    req->dev = s;
    QTAILQ_INSERT_TAIL(&s->live_requests, req, next);
    return (PyObject *)req;
}

/* Invalidate every view of @req; report views the model kept. */
static void request_kill_views(PyembRequest *req, VirtIOPyemb *s)
{
    bool kept = false;
    Py_ssize_t at = 0;
    PyObject *groups[2] = { req->readable, req->writable };

    for (int g = 0; g < 2; g++) {
        if (!groups[g]) {
            continue;
        }
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(groups[g]); i++, at++) {
            kept |= guest_view_invalidate(PyTuple_GET_ITEM(groups[g], i),
                                          PyTuple_GET_ITEM(req->regions, at));
        }
    }
    if (kept) {
        warn_kept_views(s, "completing a request");
    }
}

/*
 * Completion batches (``with handle.batch():``): a thread without the BQL
 * that completes requests inside one holds them back and pushes them all
 * itself when the outermost batch ends, taking the BQL once.  Without a
 * batch, every completion from such a thread wakes the main loop.
 */
static __thread VirtIOPyemb *batch_dev;
static __thread unsigned batch_depth;
static __thread bool batch_held;        /* completions wait for the end */

/*
 * Complete @request with @written bytes: kill its views, then push the
 * element now (BQL held), at the end of this thread's batch, or through
 * the completion bottom half.  Returns false if it was already finished
 * (completed or cancelled by a reset).
 */
bool pyemb_request_finish(PyObject *request, uint32_t written)
{
    PyembRequest *req = (PyembRequest *)request;
    VirtIOPyemb *s = req->dev;
    VirtQueueElement *elem = req->elem;

    if (req->finished) {
        return false;
    }
    req->finished = true;
    request_kill_views(req, s);
    if (!s) {
        return false;
    }
    QTAILQ_REMOVE(&s->live_requests, req, next);
    req->dev = NULL;
    req->elem = NULL;
    if (bql_locked()) {
        pyemb_push_element(s, req->queue_index, elem, written);
    } else if (batch_depth && batch_dev == s) {
        pyemb_queue_completion(s, req->queue_index, elem, written, false);
        batch_held = true;
    } else {
        pyemb_queue_completion(s, req->queue_index, elem, written, true);
    }
    return true;
}

/* Return @req's element to QEMU unused: the guest never sees it. */
void pyemb_cancel_request(PyembRequest *req)
{
    VirtIOPyemb *s = req->dev;

    assert(bql_locked());       /* the virtqueue is QEMU's: only under its lock */

    QTAILQ_REMOVE(&s->live_requests, req, next);
    req->finished = true;
    req->cancelled = true;
    request_kill_views(req, s);
    virtqueue_detach_element(s->vqs[req->queue_index], req->elem, 0);
    g_free(req->elem);
    req->elem = NULL;
    req->dev = NULL;
}

/*
 * Forget @req without the BQL: its element waits in s->orphans for the
 * thread that is dropping (it holds the BQL) to detach it.  GIL held.
 */
static void pyemb_orphan_request(PyembRequest *req)
{
    VirtIOPyemb *s = req->dev;
    PyembOrphan orphan = { req->queue_index, req->elem };

    QTAILQ_REMOVE(&s->live_requests, req, next);
    req->finished = true;
    req->cancelled = true;
    request_kill_views(req, s);
    g_array_append_val(s->orphans, orphan);
    req->elem = NULL;
    req->dev = NULL;
}

/* Device reset or unrealize: drop every request the model still holds. */
unsigned pyemb_cancel_requests(VirtIOPyemb *s)
{
    unsigned n = 0;

    for (guint i = 0; i < s->orphans->len; i++) {
        PyembOrphan *orphan = &g_array_index(s->orphans, PyembOrphan, i);

        virtqueue_detach_element(s->vqs[orphan->queue_index], orphan->elem, 0);
        g_free(orphan->elem);
        n++;
    }
    g_array_set_size(s->orphans, 0);

    while (!QTAILQ_EMPTY(&s->live_requests)) {
        pyemb_cancel_request(QTAILQ_FIRST(&s->live_requests));
        n++;
    }
    return n;
}

static PyObject *request_complete(PyObject *self, PyObject *args,
                                  PyObject *kwargs)
{
    static const char *kwlist[] = { "written", NULL };
    PyembRequest *req = (PyembRequest *)self;
    Py_ssize_t written = 0;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|n:complete",
                                     (char **)kwlist, &written)) {
        return NULL;
    }
    if (req->cancelled) {
        Py_RETURN_FALSE;        /* a device reset dropped it */
    }
    if (req->finished) {
        PyErr_SetString(PyExc_RuntimeError, "request already completed");
        return NULL;
    }
    if (written < 0 || (size_t)written > req->writable_size) {
        PyErr_Format(PyExc_ValueError,
                     "written=%zd is outside the request's %zu writable bytes",
                     written, req->writable_size);
        return NULL;
    }
    return PyBool_FromLong(pyemb_request_finish(self, written));
}

static void request_dealloc(PyObject *self)
{
    PyembRequest *req = (PyembRequest *)self;
    PyObject *exc, *value, *tb;

    /*
     * A request may be freed while an exception propagates (a C function
     * that failed drops its references): what runs below calls into Python
     * and clears errors, so the exception in flight is put aside meanwhile.
     */
    PyErr_Fetch(&exc, &value, &tb);
    if (!req->finished && req->dev) {
        if (req->dev->dropping && bql_locked()) {
            /* A reset or unplug forgets requests: that is what it is for. */
            pyemb_cancel_request(req);
        } else if (req->dev->dropping) {
            /* Another thread, while the dropping thread let the GIL go. */
            pyemb_orphan_request(req);
        } else {
            warn_report("%s: a request on queue %u was dropped without being "
                        "completed; returning it to the guest empty",
                        object_get_typename(OBJECT(req->dev)),
                        req->queue_index);
            pyemb_request_finish(self, 0);
        }
    }
    Py_XDECREF(req->readable);
    Py_XDECREF(req->writable);
    Py_XDECREF(req->regions);
    PyObject_Free(self);
    PyErr_Restore(exc, value, tb);
}

static PyObject *request_get_done(PyObject *self, void *closure)
{
    return PyBool_FromLong(((PyembRequest *)self)->finished);
}

static PyObject *request_get_cancelled(PyObject *self, void *closure)
{
    return PyBool_FromLong(((PyembRequest *)self)->cancelled);
}

static PyMethodDef request_methods[] = {
    { "complete", (PyCFunction)(void (*)(void))request_complete,
      METH_VARARGS | METH_KEYWORDS,
      "complete(written=0) -> bool\n\n"
      "Return the request to the guest with `written` bytes written into its\n"
      "writable part.  Callable from any thread.  Every view of the request\n"
      "is dead afterwards.  Returns False if a device reset already dropped\n"
      "the request; raises RuntimeError if it was completed before." },
    { NULL }
};

static PyMemberDef request_members[] = {
    { "queue", T_UINT, offsetof(PyembRequest, queue_index), READONLY,
      "index of the virtqueue the request came from" },
    { "readable", T_OBJECT_EX, offsetof(PyembRequest, readable), READONLY,
      "tuple of read-only memoryviews: the device-readable descriptors" },
    { "writable", T_OBJECT_EX, offsetof(PyembRequest, writable), READONLY,
      "tuple of writable memoryviews: the device-writable descriptors" },
    { "readable_size", T_PYSSIZET, offsetof(PyembRequest, readable_size),
      READONLY, "total bytes the device may read" },
    { "writable_size", T_PYSSIZET, offsetof(PyembRequest, writable_size),
      READONLY, "total bytes the device may write" },
    { NULL }
};

static PyGetSetDef request_getset[] = {
    { "done", request_get_done, NULL, "True once completed or cancelled" },
    { "cancelled", request_get_cancelled, NULL,
      "True if a device reset dropped the request" },
    { NULL }
};

static PyTypeObject RequestType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "_pyemb.Request",
    .tp_basicsize = sizeof(PyembRequest),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = request_dealloc,
    .tp_methods = request_methods,
    .tp_members = request_members,
    .tp_getset = request_getset,
    .tp_doc = "One virtqueue element handed to a pyemb device model.",
};

/* ---- GuestMapping ----------------------------------------------------- */

struct PyembMapping {
    PyObject_HEAD
    VirtIOPyemb *dev;           /* NULL once released */
    void *ptr;
    uint64_t addr;
    uint64_t len;
    bool writable;
    PyObject *view;
    PyObject *region;
    QTAILQ_ENTRY(PyembMapping) next;
};

static PyTypeObject GuestMappingType;

static void unmap_guest_any_thread(VirtIOPyemb *s, void *ptr, hwaddr len,
                                   bool writable)
{
    if (bql_locked()) {
        pyemb_unmap_guest(s, ptr, len, writable);
    } else {
        /* A model's thread (a stream worker done with a buffer). */
        pyemb_queue_unmap(s, ptr, len, writable);
    }
}

/* The last export of a released mapping's view went: unmap it now. */
static void guest_region_unmap(GuestRegion *r)
{
    VirtIOPyemb *s = r->unmap_dev;

    QTAILQ_REMOVE(&s->deferred_unmaps, r, deferred_next);
    r->unmap_dev = NULL;
    trace_pyemb_unmap_guest_deferred(r->len);
    unmap_guest_any_thread(s, r->ptr, r->len, r->unmap_writable);
}

static void mapping_release(PyembMapping *m)
{
    VirtIOPyemb *s = m->dev;
    GuestRegion *r = (GuestRegion *)m->region;

    if (!s) {
        return;
    }
    QTAILQ_REMOVE(&s->mappings, m, next);
    m->dev = NULL;
    trace_pyemb_unmap_guest(m->addr, m->len);
    if (guest_view_invalidate(m->view, m->region)) {
        /* Still read or written through: unmapped when that ends. */
        r->unmap_dev = s;
        r->unmap_writable = m->writable;
        QTAILQ_INSERT_TAIL(&s->deferred_unmaps, r, deferred_next);
        return;
    }
    unmap_guest_any_thread(s, m->ptr, m->len, m->writable);
}

void pyemb_release_mappings(VirtIOPyemb *s)
{
    while (!QTAILQ_EMPTY(&s->mappings)) {
        mapping_release(QTAILQ_FIRST(&s->mappings));
    }
}

/*
 * Unplug: the device goes, so the unmaps still waiting for their views'
 * exports happen now, and those views are stale (reported once).
 */
void pyemb_release_deferred_unmaps(VirtIOPyemb *s)
{
    if (!QTAILQ_EMPTY(&s->deferred_unmaps)) {
        warn_kept_views(s, "releasing a guest mapping");
    }
    while (!QTAILQ_EMPTY(&s->deferred_unmaps)) {
        guest_region_unmap(QTAILQ_FIRST(&s->deferred_unmaps));
    }
}

static PyObject *mapping_release_method(PyObject *self, PyObject *unused)
{
    mapping_release((PyembMapping *)self);
    Py_RETURN_NONE;
}

static PyObject *mapping_enter(PyObject *self, PyObject *unused)
{
    return Py_NewRef(self);
}

static PyObject *mapping_exit(PyObject *self, PyObject *args)
{
    mapping_release((PyembMapping *)self);
    Py_RETURN_FALSE;
}

static void mapping_dealloc(PyObject *self)
{
    PyembMapping *m = (PyembMapping *)self;
    PyObject *exc, *value, *tb;

    PyErr_Fetch(&exc, &value, &tb);     /* as in request_dealloc */
    mapping_release(m);
    Py_XDECREF(m->view);
    Py_XDECREF(m->region);
    PyObject_Free(self);
    PyErr_Restore(exc, value, tb);
}

static PyObject *mapping_get_view(PyObject *self, void *closure)
{
    PyembMapping *m = (PyembMapping *)self;

    if (!m->dev) {
        PyErr_SetString(PyExc_ValueError, "guest mapping was released");
        return NULL;
    }
    return Py_NewRef(m->view);
}

static PyMethodDef mapping_methods[] = {
    { "release", mapping_release_method, METH_NOARGS,
      "Unmap the guest memory; the view is dead afterwards." },
    { "__enter__", mapping_enter, METH_NOARGS, NULL },
    { "__exit__", mapping_exit, METH_VARARGS, NULL },
    { NULL }
};

static PyMemberDef mapping_members[] = {
    { "address", T_ULONGLONG, offsetof(PyembMapping, addr), READONLY,
      "guest-physical address" },
    { "length", T_ULONGLONG, offsetof(PyembMapping, len), READONLY,
      "length in bytes" },
    { "writable", T_BOOL, offsetof(PyembMapping, writable), READONLY,
      "whether the view is writable" },
    { NULL }
};

static PyGetSetDef mapping_getset[] = {
    { "view", mapping_get_view, NULL, "memoryview over the guest memory" },
    { NULL }
};

static PyTypeObject GuestMappingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "_pyemb.GuestMapping",
    .tp_basicsize = sizeof(PyembMapping),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = mapping_dealloc,
    .tp_methods = mapping_methods,
    .tp_members = mapping_members,
    .tp_getset = mapping_getset,
    .tp_doc = "A range of guest RAM mapped for longer than one request.",
};

/* ---- Device handle ---------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    VirtIOPyemb *dev;           /* NULL once the device is unrealized */
} DeviceHandle;

static VirtIOPyemb *handle_device(PyObject *self)
{
    VirtIOPyemb *s = ((DeviceHandle *)self)->dev;

    if (!s) {
        PyErr_SetString(PyExc_RuntimeError, "the QEMU device is gone");
    }
    return s;
}

/* True if [addr, addr + len) is guest RAM, so mapping needs no bounce. */
static bool range_is_guest_ram(AddressSpace *as, uint64_t addr, uint64_t len,
                               bool writable)
{
    hwaddr xlat, plen = len;
    MemoryRegion *mr;

    RCU_READ_LOCK_GUARD();
    mr = address_space_translate(as, addr, &xlat, &plen, writable,
                                 MEMTXATTRS_UNSPECIFIED);
    return memory_region_is_ram(mr) && !(writable && mr->readonly) &&
           plen >= len;
}

static PyObject *handle_map_guest(PyObject *self, PyObject *args,
                                  PyObject *kwargs)
{
    static const char *kwlist[] = { "address", "length", "writable",
                                    NULL };
    VirtIOPyemb *s = handle_device(self);
    unsigned long long addr, len;
    int writable = 1;
    dma_addr_t mapped;
    ram_addr_t offset;
    void *ptr;
    AddressSpace *as;
    PyembMapping *m;
    PyObject *region;

    if (!s || !PyArg_ParseTupleAndKeywords(args, kwargs, "KK|p:map_guest",
                                           (char **)kwlist, &addr, &len,
                                           &writable)) {
        return NULL;
    }
    if (len == 0 || addr + len < addr || len > PY_SSIZE_T_MAX) {
        value_error("invalid guest range 0x%llx+0x%llx", addr, len);
        return NULL;
    }
    as = VIRTIO_DEVICE(s)->dma_as;
    if (!range_is_guest_ram(as, addr, len, writable)) {
        value_error("guest range 0x%llx+0x%llx is not %sguest RAM",
                    addr, len, writable ? "writable " : "");
        return NULL;
    }
    mapped = len;
    ptr = dma_memory_map(as, addr, &mapped,
                         writable ? DMA_DIRECTION_FROM_DEVICE
                                  : DMA_DIRECTION_TO_DEVICE,
                         MEMTXATTRS_UNSPECIFIED);
    if (!ptr || mapped < len || !memory_region_from_host(ptr, &offset)) {
        if (ptr) {
            dma_memory_unmap(as, ptr, mapped, DMA_DIRECTION_TO_DEVICE, 0);
        }
        value_error("guest range 0x%llx+0x%llx is not contiguous guest RAM",
                    addr, len);
        return NULL;
    }
    trace_pyemb_map_guest(addr, len, writable);

    m = PyObject_New(PyembMapping, &GuestMappingType);
    if (!m) {
        dma_memory_unmap(as, ptr, mapped, DMA_DIRECTION_TO_DEVICE, 0);
        return NULL;
    }
    m->dev = NULL;
    m->ptr = ptr;
    m->addr = addr;
    m->len = len;
    m->writable = writable;
    m->region = NULL;
    m->view = guest_view_new(ptr, len, !writable, &region);
    if (!m->view) {
        dma_memory_unmap(as, ptr, mapped, DMA_DIRECTION_TO_DEVICE, 0);
        Py_DECREF(m);
        return NULL;
    }
    m->region = region;
    m->dev = s;
    QTAILQ_INSERT_TAIL(&s->mappings, m, next);
    return (PyObject *)m;
}

static PyObject *handle_notify_config(PyObject *self, PyObject *unused)
{
    VirtIOPyemb *s = handle_device(self);

    if (!s) {
        return NULL;
    }
    pyemb_request_config_notify(s);
    Py_RETURN_NONE;
}

static PyObject *handle_get_name(PyObject *self, void *closure)
{
    VirtIOPyemb *s = handle_device(self);
    DeviceState *dev;

    if (!s) {
        return NULL;
    }
    dev = DEVICE(s);
    if (dev->id) {
        return PyUnicode_FromString(dev->id);
    }
    if (dev->parent_bus && dev->parent_bus->parent &&
        dev->parent_bus->parent->id) {
        return PyUnicode_FromString(dev->parent_bus->parent->id);
    }
    return PyUnicode_FromString(object_get_typename(OBJECT(s)));
}

static PyObject *handle_get_live(PyObject *self, void *closure)
{
    return PyBool_FromLong(((DeviceHandle *)self)->dev != NULL);
}

static PyObject *handle_get_pending(PyObject *self, void *closure)
{
    VirtIOPyemb *s = ((DeviceHandle *)self)->dev;
    PyembRequest *req;
    long n = 0;

    if (s) {
        QTAILQ_FOREACH(req, &s->live_requests, next) {
            n++;
        }
    }
    return PyLong_FromLong(n);
}

/* ---- the shared memory region ---- */

static bool view_released(PyObject *view)
{
    return ((PyMemoryViewObject *)view)->flags & _Py_MEMORYVIEW_RELEASED;
}

/*
 * handle.shared_memory: one writable memoryview over the whole region, made
 * on first use and made again if the model released it (a with block);
 * None where the device has no region (shm-size=0, virtio-mmio).
 */
static PyObject *handle_get_shared_memory(PyObject *self, void *closure)
{
    VirtIOPyemb *s = handle_device(self);
    PyObject *view, *region;

    if (!s) {
        return NULL;
    }
    if (!s->shm) {
        Py_RETURN_NONE;
    }
    if (s->shm_view && view_released(s->shm_view)) {
        Py_CLEAR(s->shm_view);
    }
    if (!s->shm_view && s->shm_region) {
        s->shm_view = PyMemoryView_FromObject(s->shm_region);
    } else if (!s->shm_view) {
        view = guest_view_new(s->shm->ptr, s->shm->size, false, &region);
        if (!view) {
            return NULL;
        }
        pyemb_shm_ref(s->shm);
        ((GuestRegion *)region)->shm = s->shm;
        s->shm_view = view;
        s->shm_region = region;
    }
    return Py_XNewRef(s->shm_view);
}

/* Unrealize: handle.shared_memory dies (its memory lives on, see PyembShm). */
void pyemb_revoke_shm_view(VirtIOPyemb *s)
{
    if (!s->shm_region) {
        return;
    }
    if (guest_view_invalidate(s->shm_view, s->shm_region)) {
        warn_kept_views(s, "its unplug (shared memory)");
    }
    Py_CLEAR(s->shm_view);
    Py_CLEAR(s->shm_region);
}

static PyObject *handle_discard_shared_memory(PyObject *self, PyObject *args,
                                              PyObject *kwargs)
{
    static const char *kwlist[] = { "offset", "length", NULL };
    VirtIOPyemb *s = handle_device(self);
    long long offset, length;
    PyembShm *shm;
    PyThreadState *ts;
    int ret, err;

    if (!s || !PyArg_ParseTupleAndKeywords(args, kwargs,
                                           "LL:discard_shared_memory",
                                           (char **)kwlist, &offset,
                                           &length)) {
        return NULL;
    }
    shm = s->shm;
    if (!shm) {
        PyErr_SetString(PyExc_ValueError,
                        "the device has no shared memory region");
        return NULL;
    }
    if (offset < 0 || length < 0 || (uint64_t)offset > shm->size ||
        (uint64_t)length > shm->size - offset) {
        value_error("range 0x%llx+0x%llx is outside the shared memory "
                    "region (0x%" PRIx64 " bytes)", offset, length, shm->size);
        return NULL;
    }
    if (!length) {
        Py_RETURN_NONE;
    }
    pyemb_shm_ref(shm);         /* the device may go while the GIL is free */
    ts = PyEval_SaveThread();
    ret = pyemb_shm_discard(shm, offset, length);
    err = errno;
    PyEval_RestoreThread(ts);
    pyemb_shm_unref(shm);
    if (ret < 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

/* handle.batch() is the handle itself: it reads better in a with. */
static PyObject *handle_batch(PyObject *self, PyObject *unused)
{
    return handle_device(self) ? Py_NewRef(self) : NULL;
}

static PyObject *handle_enter(PyObject *self, PyObject *unused)
{
    VirtIOPyemb *s = handle_device(self);

    if (!s) {
        return NULL;
    }
    if (batch_depth && batch_dev != s) {
        PyErr_SetString(PyExc_RuntimeError,
                        "a completion batch of another device is open "
                        "in this thread");
        return NULL;
    }
    batch_dev = s;
    batch_depth++;
    return Py_NewRef(self);
}

static PyObject *handle_exit(PyObject *self, PyObject *args)
{
    VirtIOPyemb *s = ((DeviceHandle *)self)->dev;
    bool held = batch_held;

    if (batch_depth == 0 || --batch_depth > 0) {
        Py_RETURN_FALSE;
    }
    batch_dev = NULL;
    batch_held = false;
    /* If the device was unplugged meanwhile, its queue went with it. */
    if (held && s) {
        pyemb_push_completions_from_thread(s);
    }
    Py_RETURN_FALSE;
}

static PyMethodDef handle_methods[] = {
    { "map_guest", (PyCFunction)(void (*)(void))handle_map_guest,
      METH_VARARGS | METH_KEYWORDS,
      "map_guest(address, length, writable=True) -> GuestMapping\n\n"
      "Map guest RAM for longer than one request.  Raises ValueError if any\n"
      "byte of the range is not guest RAM.  Callable from any thread." },
    { "notify_config", handle_notify_config, METH_NOARGS,
      "Tell the driver that the config space changed." },
    { "batch", handle_batch, METH_NOARGS,
      "with handle.batch(): ... -- requests this thread completes inside\n"
      "are pushed together when the block ends, by this thread, which\n"
      "then takes QEMU's lock (with the GIL let go): end the block holding\n"
      "no lock that handle_request may wait for.  Without it, completions\n"
      "from threads of the model wake QEMU's main loop one by one." },
    { "discard_shared_memory",
      (PyCFunction)(void (*)(void))handle_discard_shared_memory,
      METH_VARARGS | METH_KEYWORDS,
      "discard_shared_memory(offset, length)\n\n"
      "Zero that range of the shared memory region and give its whole pages\n"
      "back to the host (madvise MADV_DONTNEED), so freed buffers keep no\n"
      "host memory; the guest reads zeros there.  ValueError for a range\n"
      "outside the region or a device without one.  Callable from any\n"
      "thread." },
    { "__enter__", handle_enter, METH_NOARGS, NULL },
    { "__exit__", handle_exit, METH_VARARGS, NULL },
    { NULL }
};

static PyGetSetDef handle_getset[] = {
    { "name", handle_get_name, NULL, "the device's id, for messages" },
    { "live", handle_get_live, NULL, "False once the device is unrealized" },
    { "pending_requests", handle_get_pending, NULL,
      "requests popped but not yet completed" },
    { "shared_memory", handle_get_shared_memory, NULL,
      "writable memoryview over the whole shared memory region 0 (what the\n"
      "guest maps through the BAR), or None where there is none; dead\n"
      "(ValueError) once the device is unplugged" },
    { NULL }
};

static PyTypeObject DeviceHandleType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "_pyemb.Device",
    .tp_basicsize = sizeof(DeviceHandle),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_methods = handle_methods,
    .tp_getset = handle_getset,
    .tp_doc = "The QEMU side of one pyemb device.",
};

PyObject *pyemb_device_handle_new(VirtIOPyemb *s)
{
    DeviceHandle *h = PyObject_New(DeviceHandle, &DeviceHandleType);

    if (h) {
        h->dev = s;
    }
    return (PyObject *)h;
}

void pyemb_device_handle_detach(PyObject *handle)
{
    if (handle) {
        ((DeviceHandle *)handle)->dev = NULL;
    }
}

/* ---- module ----------------------------------------------------------- */

static PyObject *module_log(PyObject *self, PyObject *args, bool warning)
{
    const char *msg;

    if (!PyArg_ParseTuple(args, "s", &msg)) {
        return NULL;
    }
    if (warning) {
        warn_report("%s", msg);
    } else {
        error_report("%s", msg);
    }
    Py_RETURN_NONE;
}

static PyObject *module_log_error(PyObject *self, PyObject *args)
{
    return module_log(self, args, false);
}

static PyObject *module_log_warning(PyObject *self, PyObject *args)
{
    return module_log(self, args, true);
}

static PyMethodDef module_methods[] = {
    { "log_error", module_log_error, METH_VARARGS,
      "log_error(message): report through QEMU's error_report()" },
    { "log_warning", module_log_warning, METH_VARARGS,
      "log_warning(message): report through QEMU's warn_report()" },
    { NULL }
};

static struct PyModuleDef pyemb_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_pyemb",
    .m_doc = "The QEMU side of pyemb; exists only inside a patched QEMU.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyObject *pyemb_module_init(void)
{
    PyObject *m;
    PyTypeObject *types[] = { &GuestRegionType, &RequestType,
                              &GuestMappingType, &DeviceHandleType };

    for (size_t i = 0; i < ARRAY_SIZE(types); i++) {
        if (PyType_Ready(types[i]) < 0) {
            return NULL;
        }
    }
    m = PyModule_Create(&pyemb_module);
    if (!m) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "Request", (PyObject *)&RequestType) < 0 ||
        PyModule_AddObjectRef(m, "GuestMapping",
                              (PyObject *)&GuestMappingType) < 0 ||
        PyModule_AddObjectRef(m, "Device",
                              (PyObject *)&DeviceHandleType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
