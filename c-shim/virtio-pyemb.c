/*
 * pyemb: virtio devices whose behaviour is a Python device model
 *
 * virtio-snd-py (ID 25), virtio-video-py (ID 31 decoder, 30 encoder) and
 * virtio-media-py (ID 48) are thin: realize asks pyemb.host for a device
 * model, takes the device ID, queues, features and config size from it,
 * and every popped element goes to model.handle_request(queue, request).
 * The model completes requests at once or later from any thread;
 * completions from threads without the BQL are pushed by a bottom half in
 * the main loop.  virtio-media-py also has shared memory region 0 on PCI,
 * host memory the model writes video frames into and the guest maps.
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "pyemb-internal.h"
#include "qapi/error.h"
#include "qemu/error-report.h"
#include "qemu/log.h"
#include "qemu/lockable.h"
#include "qemu/main-loop.h"
#include "qemu/module.h"
#include "exec/memory.h"
#include "system/dma.h"
#include "hw/qdev-properties.h"
#include "migration/vmstate.h"
#include "standard-headers/linux/virtio_ids.h"
#include "trace.h"

#define PYEMB_MAX_CONFIG_SIZE 4096
#define PYEMB_DEVICE_FEATURE_BITS 24    /* bits 0..23 are device-specific */

static const char *pyemb_name(VirtIOPyemb *s)
{
    return object_get_typename(OBJECT(s));
}

/* ---- completions ------------------------------------------------------ */

void pyemb_push_element(VirtIOPyemb *s, unsigned queue_index,
                        VirtQueueElement *elem, uint32_t written)
{
    VirtQueue *vq = s->vqs[queue_index];

    trace_pyemb_complete(pyemb_name(s), queue_index, written, 0);
    virtqueue_push(vq, elem, written);
    virtio_notify(VIRTIO_DEVICE(s), vq);
    g_free(elem);
}

void pyemb_queue_completion(VirtIOPyemb *s, unsigned queue_index,
                            VirtQueueElement *elem, uint32_t written,
                            bool schedule)
{
    PyembDone *done = g_new(PyembDone, 1);

    trace_pyemb_complete(pyemb_name(s), queue_index, written, 1);
    done->elem = elem;
    done->queue_index = queue_index;
    done->written = written;
    WITH_QEMU_LOCK_GUARD(&s->done_lock) {
        QSIMPLEQ_INSERT_TAIL(&s->done, done, next);
    }
    if (schedule) {
        qemu_bh_schedule(s->completion_bh);
    }
}

/* BQL held: give back a guest mapping (QEMU's memory API wants the BQL). */
void pyemb_unmap_guest(VirtIOPyemb *s, void *ptr, hwaddr len, bool writable)
{
    assert(bql_locked());
    dma_memory_unmap(VIRTIO_DEVICE(s)->dma_as, ptr, len,
                     writable ? DMA_DIRECTION_FROM_DEVICE : DMA_DIRECTION_TO_DEVICE,
                     writable ? len : 0);
}

/* A thread without the BQL released a mapping: the main loop unmaps it. */
void pyemb_queue_unmap(VirtIOPyemb *s, void *ptr, hwaddr len, bool writable)
{
    PyembUnmap *unmap = g_new(PyembUnmap, 1);

    unmap->ptr = ptr;
    unmap->len = len;
    unmap->writable = writable;
    WITH_QEMU_LOCK_GUARD(&s->done_lock) {
        QSIMPLEQ_INSERT_TAIL(&s->unmaps, unmap, next);
    }
    qemu_bh_schedule(s->completion_bh);
}

/* BQL held: the unmaps other threads queued. */
static void pyemb_flush_unmaps(VirtIOPyemb *s)
{
    QSIMPLEQ_HEAD(, PyembUnmap) batch = QSIMPLEQ_HEAD_INITIALIZER(batch);
    PyembUnmap *unmap;

    WITH_QEMU_LOCK_GUARD(&s->done_lock) {
        QSIMPLEQ_CONCAT(&batch, &s->unmaps);
    }
    while ((unmap = QSIMPLEQ_FIRST(&batch))) {
        QSIMPLEQ_REMOVE_HEAD(&batch, next);
        pyemb_unmap_guest(s, unmap->ptr, unmap->len, unmap->writable);
        g_free(unmap);
    }
}

void pyemb_request_config_notify(VirtIOPyemb *s)
{
    if (bql_locked()) {
        virtio_notify_config(VIRTIO_DEVICE(s));
        return;
    }
    WITH_QEMU_LOCK_GUARD(&s->done_lock) {
        s->config_changed = true;
    }
    qemu_bh_schedule(s->completion_bh);
}

/* BQL held: push what other threads completed, one notify per queue. */
static void pyemb_flush_completions(VirtIOPyemb *s)
{
    VirtIODevice *vdev = VIRTIO_DEVICE(s);
    QSIMPLEQ_HEAD(, PyembDone) batch = QSIMPLEQ_HEAD_INITIALIZER(batch);
    g_autofree bool *touched = g_new0(bool, s->num_queues);
    bool config_changed;
    PyembDone *done;

    WITH_QEMU_LOCK_GUARD(&s->done_lock) {
        QSIMPLEQ_CONCAT(&batch, &s->done);
        config_changed = s->config_changed;
        s->config_changed = false;
    }
    while ((done = QSIMPLEQ_FIRST(&batch))) {
        QSIMPLEQ_REMOVE_HEAD(&batch, next);
        virtqueue_push(s->vqs[done->queue_index], done->elem, done->written);
        touched[done->queue_index] = true;
        g_free(done->elem);
        g_free(done);
    }
    for (unsigned i = 0; i < s->num_queues; i++) {
        if (touched[i]) {
            virtio_notify(vdev, s->vqs[i]);
        }
    }
    if (config_changed) {
        virtio_notify_config(vdev);
    }
    pyemb_flush_unmaps(s);
}

static void pyemb_completion_bh(void *opaque)
{
    pyemb_flush_completions(opaque);
}

/*
 * The object whose allocation holds @s: on PCI the device is embedded in
 * its proxy (a reference to the embedded object does not keep the proxy's
 * memory), on virtio-mmio it is its own.
 */
static Object *pyemb_owner(VirtIOPyemb *s)
{
    Object *obj = OBJECT(s);

    while (!obj->free && obj->parent) {
        obj = obj->parent;
    }
    return obj;
}

/* ---- shared memory region --------------------------------------------- */

/* shm-size: 0 (no region) or a power of two of at least 1 MiB. */
static bool pyemb_shm_check(VirtIOPyemb *s, Error **errp)
{
    if (s->shm_size && (s->shm_size < MiB || !is_power_of_2(s->shm_size))) {
        error_setg(errp, "%s: shm-size must be 0 (no shared memory) or a "
                   "power of two of at least 1M, not %" PRIu64,
                   pyemb_name(s), s->shm_size);
        return false;
    }
    return true;
}

/*
 * Called by the PCI proxy before @s is realized.  The memory is an
 * anonymous MAP_NORESERVE mapping the shim owns: untouched pages cost
 * nothing (a 256 MiB region is address space until the model writes
 * frames into it) and discard_shared_memory() gives pages back with
 * madvise().  It is put under a RAM MemoryRegion with
 * memory_region_init_ram_ptr() rather than an I/O region, so that guest
 * accesses through the BAR are plain memory (a KVM memory slot, TCG's
 * direct path), not an exit per access; QEMU never frees the memory of
 * such a block (RAM_PREALLOC), so Python's view of it can outlive the
 * device (see PyembShm).  The region's owner is the object that holds @s's
 * memory (the proxy): a flat view that still maps the BAR pins it.
 */
bool pyemb_shm_create(VirtIOPyemb *s, Error **errp)
{
    void *ptr;

    if (!pyemb_shm_check(s, errp)) {
        return false;
    }
    if (!s->shm_size || s->shm) {
        return true;
    }
    ptr = mmap(NULL, s->shm_size, PROT_READ | PROT_WRITE,
               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (ptr == MAP_FAILED) {
        error_setg_errno(errp, errno, "%s: cannot reserve %" PRIu64 " bytes "
                         "of shared memory (shm-size)", pyemb_name(s),
                         s->shm_size);
        return false;
    }
    s->shm = g_new0(PyembShm, 1);
    s->shm->ptr = ptr;
    s->shm->size = s->shm_size;
    s->shm->refs = 1;
    memory_region_init_ram_ptr(&s->shm_mr, pyemb_owner(s), "pyemb-shm",
                               s->shm_size, ptr);
    return true;
}

void pyemb_shm_ref(PyembShm *shm)
{
    qatomic_inc(&shm->refs);
}

void pyemb_shm_unref(PyembShm *shm)
{
    if (qatomic_fetch_dec(&shm->refs) == 1) {
        munmap(shm->ptr, shm->size);
        g_free(shm);
    }
}

/*
 * Zero [offset, offset + length) of the region, giving its whole pages back
 * to the host; the caller checked the range.  Any thread, no lock needed.
 */
int pyemb_shm_discard(PyembShm *shm, uint64_t offset, uint64_t length)
{
    uint64_t page = qemu_real_host_page_size();
    uint64_t end = offset + length;
    uint64_t first = ROUND_UP(offset, page), last = ROUND_DOWN(end, page);
    uint8_t *p = shm->ptr;

    if (first >= last) {
        memset(p + offset, 0, length);
        return 0;
    }
    memset(p + offset, 0, first - offset);
    memset(p + last, 0, end - last);
    /* Linux's MADV_DONTNEED: private anonymous pages read as zero after. */
    return madvise(p + first, last - first, MADV_DONTNEED);
}

/*
 * Finalize: no flat view maps the region any more (they pin the owner).
 * Its RAM block is freed first, then the device's reference to the memory
 * is dropped after an RCU grace period, queued behind the block's own.
 */
static void pyemb_instance_finalize(Object *obj)
{
    VirtIOPyemb *s = VIRTIO_PYEMB(obj);

    if (!s->shm) {
        return;
    }
    if (OBJECT(&s->shm_mr)->parent) {
        object_unparent(OBJECT(&s->shm_mr));
    }
    call_rcu(s->shm, pyemb_shm_unref, rcu);
    s->shm = NULL;
}

/* ---- completions from threads ----------------------------------------- */

/*
 * A thread without the BQL pushes @s's queued completions itself, so that
 * the main loop is not woken for them.  GIL held on entry and on return;
 * it is let go while taking the BQL, because the main loop takes the BQL
 * first and the GIL second.
 */
void pyemb_push_completions_from_thread(VirtIOPyemb *s)
{
    PyThreadState *ts;
    Object *owner = pyemb_owner(s);

    object_ref(owner);          /* it may be unplugged while we wait */
    ts = PyEval_SaveThread();
    bql_lock();
    if (s->vqs) {               /* NULL once unrealized */
        pyemb_flush_completions(s);
    }
    object_unref(owner);
    bql_unlock();
    PyEval_RestoreThread(ts);
}

/* Reset or unrealize: completions still queued go back unused. */
static void pyemb_drop_queued_completions(VirtIOPyemb *s)
{
    QSIMPLEQ_HEAD(, PyembDone) batch = QSIMPLEQ_HEAD_INITIALIZER(batch);
    PyembDone *done;

    WITH_QEMU_LOCK_GUARD(&s->done_lock) {
        QSIMPLEQ_CONCAT(&batch, &s->done);
        s->config_changed = false;
    }
    while ((done = QSIMPLEQ_FIRST(&batch))) {
        QSIMPLEQ_REMOVE_HEAD(&batch, next);
        virtqueue_detach_element(s->vqs[done->queue_index], done->elem, 0);
        g_free(done->elem);
        g_free(done);
    }
    pyemb_flush_unmaps(s);      /* those are done, whatever the reset */
}

/* ---- requests --------------------------------------------------------- */

/*
 * Views are only ever handed out over guest RAM: a chain that QEMU had to
 * map through a bounce buffer would leave Python a pointer into memory that
 * is freed on completion.
 */
static bool pyemb_elem_in_guest_ram(VirtQueueElement *elem)
{
    ram_addr_t offset;

    for (unsigned i = 0; i < elem->out_num; i++) {
        if (!memory_region_from_host(elem->out_sg[i].iov_base, &offset)) {
            return false;
        }
    }
    for (unsigned i = 0; i < elem->in_num; i++) {
        if (!memory_region_from_host(elem->in_sg[i].iov_base, &offset)) {
            return false;
        }
    }
    return true;
}

static void pyemb_handle_output(VirtIODevice *vdev, VirtQueue *vq)
{
    VirtIOPyemb *s = VIRTIO_PYEMB(vdev);
    unsigned queue_index = virtio_get_queue_index(vq);
    VirtQueueElement *elem;
    PyObject *py_queue;
    bool gil;

    if (!s->dispatch || !pyemb_python_running()) {
        return;
    }
    gil = pyemb_gil_acquire();
    py_queue = PyLong_FromUnsignedLong(queue_index);
    while (py_queue && (elem = virtqueue_pop(vq, sizeof(VirtQueueElement)))) {
        PyObject *request, *result, *args[2];

        if (!pyemb_elem_in_guest_ram(elem)) {
            qemu_log_mask(LOG_GUEST_ERROR, "%s: queue %u: a descriptor is "
                          "not in guest RAM; returned unused\n",
                          pyemb_name(s), queue_index);
            pyemb_push_element(s, queue_index, elem, 0);
            continue;
        }
        request = pyemb_request_new(s, queue_index, elem);
        if (!request) {
            pyemb_report_exception(pyemb_name(s), "wrapping a request");
            pyemb_push_element(s, queue_index, elem, 0);
            continue;
        }
        trace_pyemb_request(pyemb_name(s), queue_index,
                            ((PyembRequest *)request)->readable_size,
                            ((PyembRequest *)request)->writable_size);
        args[0] = py_queue;
        args[1] = request;
        result = PyObject_Vectorcall(s->dispatch, args, 2, NULL);
        if (!result) {
            /* The model's own error handling failed: never stall the queue. */
            pyemb_report_exception(pyemb_name(s), "handling a request");
            pyemb_request_finish(request, 0);
        }
        Py_XDECREF(result);
        Py_DECREF(request);
    }
    Py_XDECREF(py_queue);
    pyemb_gil_release(gil);
}

/* ---- calls into the model --------------------------------------------- */

/* model.<method>(*args); logs and swallows an exception. GIL held. */
static PyObject *pyemb_call(VirtIOPyemb *s, const char *method,
                            const char *format, ...)
{
    PyObject *callable, *args = NULL, *result = NULL;
    va_list va;

    callable = PyObject_GetAttrString(s->model, method);
    if (callable) {
        va_start(va, format);
        args = Py_VaBuildValue(format, va);
        va_end(va);
    }
    if (args) {
        result = PyObject_CallObject(callable, args);
    }
    if (!result) {
        g_autofree char *what = g_strdup_printf("calling %s()", method);
        pyemb_report_exception(pyemb_name(s), what);
    }
    Py_XDECREF(callable);
    Py_XDECREF(args);
    return result;
}

static void pyemb_get_config(VirtIODevice *vdev, uint8_t *config)
{
    VirtIOPyemb *s = VIRTIO_PYEMB(vdev);
    PyObject *bytes;
    Py_buffer buf;
    bool gil;

    memset(config, 0, s->config_size);
    if (!s->model || !pyemb_python_running()) {
        return;
    }
    gil = pyemb_gil_acquire();
    bytes = pyemb_call(s, "read_config", "()");
    if (bytes && PyObject_GetBuffer(bytes, &buf, PyBUF_SIMPLE) == 0) {
        memcpy(config, buf.buf, MIN((size_t)buf.len, s->config_size));
        PyBuffer_Release(&buf);
    } else if (bytes) {
        pyemb_report_exception(pyemb_name(s), "reading config space");
    }
    Py_XDECREF(bytes);
    pyemb_gil_release(gil);
}

static void pyemb_set_config(VirtIODevice *vdev, const uint8_t *config)
{
    VirtIOPyemb *s = VIRTIO_PYEMB(vdev);
    bool gil;

    if (!s->model || !pyemb_python_running()) {
        return;
    }
    gil = pyemb_gil_acquire();
    Py_XDECREF(pyemb_call(s, "write_config", "(y#)", (const char *)config,
                          (Py_ssize_t)s->config_size));
    pyemb_gil_release(gil);
}

static uint64_t pyemb_get_features(VirtIODevice *vdev, uint64_t features,
                                   Error **errp)
{
    VirtIOPyemb *s = VIRTIO_PYEMB(vdev);

    virtio_add_feature(&features, VIRTIO_F_VERSION_1);
    return features | s->model_features;
}

static void pyemb_set_features(VirtIODevice *vdev, uint64_t features)
{
    VirtIOPyemb *s = VIRTIO_PYEMB(vdev);
    bool gil;

    if (!s->model || !pyemb_python_running()) {
        return;
    }
    gil = pyemb_gil_acquire();
    Py_XDECREF(pyemb_call(s, "set_features", "(K)",
                          (unsigned long long)features));
    pyemb_gil_release(gil);
}

static void pyemb_set_status(VirtIODevice *vdev, uint8_t status)
{
    VirtIOPyemb *s = VIRTIO_PYEMB(vdev);
    bool gil;

    if (!s->model || !pyemb_python_running()) {
        return;
    }
    gil = pyemb_gil_acquire();
    Py_XDECREF(pyemb_call(s, "set_status", "(i)", status));
    pyemb_gil_release(gil);
}

/* Drop all of the device's Python-side state: requests, mappings. */
static unsigned pyemb_drop_guest_state(VirtIOPyemb *s)
{
    unsigned cancelled = pyemb_cancel_requests(s);

    pyemb_release_mappings(s);
    return cancelled;
}

static void pyemb_reset(VirtIODevice *vdev)
{
    VirtIOPyemb *s = VIRTIO_PYEMB(vdev);
    unsigned cancelled;
    bool gil;

    if (!s->model || !pyemb_python_running()) {
        return;
    }
    gil = pyemb_gil_acquire();
    /* The model first, so that its threads stop completing requests. */
    s->dropping = true;
    Py_XDECREF(pyemb_call(s, "reset", "()"));
    s->dropping = false;
    cancelled = pyemb_drop_guest_state(s);
    pyemb_gil_release(gil);
    pyemb_drop_queued_completions(s);
    trace_pyemb_reset(pyemb_name(s), cancelled);
}

/* ---- realize / unrealize ---------------------------------------------- */

static bool pyemb_get_uint(VirtIOPyemb *s, PyObject *model, const char *attr,
                           uint64_t max, uint64_t *out, Error **errp)
{
    PyObject *v = PyObject_GetAttrString(model, attr);
    unsigned long long n;

    if (!v) {
        g_autofree char *line = pyemb_exception_line();
        error_setg(errp, "%s: device model has no usable '%s' (%s)",
                   pyemb_name(s), attr, line);
        return false;
    }
    n = PyLong_AsUnsignedLongLong(v);
    Py_DECREF(v);
    if (PyErr_Occurred() || n > max) {
        PyErr_Clear();
        error_setg(errp, "%s: device model's '%s' must be an integer "
                   "from 0 to %" PRIu64, pyemb_name(s), attr, max);
        return false;
    }
    *out = n;
    return true;
}

/* Queue sizes from model.queue_sizes: 1..1024 entries, powers of two. */
static uint16_t *pyemb_get_queue_sizes(VirtIOPyemb *s, PyObject *model,
                                       unsigned *count, Error **errp)
{
    PyObject *seq = NULL, *list = PyObject_GetAttrString(model, "queue_sizes");
    uint16_t *sizes = NULL;
    Py_ssize_t n = 0;

    if (list) {
        seq = PySequence_Fast(list, "queue_sizes must be a sequence");
    }
    if (seq) {
        n = PySequence_Fast_GET_SIZE(seq);
    }
    if (!seq || n < 1 || n > VIRTIO_QUEUE_MAX) {
        PyErr_Clear();
        error_setg(errp, "%s: device model's queue_sizes must list 1 to %d "
                   "queue sizes", pyemb_name(s), VIRTIO_QUEUE_MAX);
        goto out;
    }
    sizes = g_new(uint16_t, n);
    for (Py_ssize_t i = 0; i < n; i++) {
        long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (PyErr_Occurred() || v < 1 || v > VIRTQUEUE_MAX_SIZE ||
            !is_power_of_2(v)) {
            PyErr_Clear();
            error_setg(errp, "%s: queue %zd size must be a power of two "
                       "from 1 to %d", pyemb_name(s), i, VIRTQUEUE_MAX_SIZE);
            g_clear_pointer(&sizes, g_free);
            goto out;
        }
        sizes[i] = v;
    }
    *count = n;
out:
    Py_XDECREF(seq);
    Py_XDECREF(list);
    return sizes;
}

/* Build the Python device model and read the device's shape from it. */
static bool pyemb_create_model(VirtIOPyemb *s, uint16_t **queue_sizes,
                               Error **errp)
{
    VirtIOPyembClass *k = VIRTIO_PYEMB_GET_CLASS(s);
    PyObject *host;
    uint64_t device_id, config_size, features;

    host = PyImport_ImportModule("pyemb.host");
    if (host) {
        s->handle = pyemb_device_handle_new(s);
    }
    if (s->handle) {
        s->model = PyObject_CallMethod(host, "create_device", "szzzO",
                                       k->kind, s->role, s->backend,
                                       s->config, s->handle);
    }
    Py_XDECREF(host);
    if (!s->model) {
        g_autofree char *line = pyemb_exception_line();
        error_setg(errp, "%s: %s", pyemb_name(s), line);
        return false;
    }
    if (!pyemb_get_uint(s, s->model, "device_id", UINT16_MAX, &device_id,
                        errp) ||
        !pyemb_get_uint(s, s->model, "config_size", PYEMB_MAX_CONFIG_SIZE,
                        &config_size, errp) ||
        !pyemb_get_uint(s, s->model, "features",
                        (1ULL << PYEMB_DEVICE_FEATURE_BITS) - 1, &features,
                        errp)) {
        return false;
    }
    *queue_sizes = pyemb_get_queue_sizes(s, s->model, &s->num_queues, errp);
    if (!*queue_sizes) {
        return false;
    }
    s->dispatch = PyObject_GetAttrString(s->model, "handle_request");
    if (!s->dispatch) {
        g_autofree char *line = pyemb_exception_line();
        error_setg(errp, "%s: device model has no handle_request (%s)",
                   pyemb_name(s), line);
        return false;
    }
    s->device_id = device_id;
    s->config_size = config_size;
    s->model_features = features;
    return true;
}

/*
 * A model still alive once the shim's references are gone sits in a
 * reference cycle (most do: streams that point back at their device); only
 * the cyclic collector frees it, and pyemb.host runs that on a thread of its
 * own, not on the main loop.  GIL held.
 */
static void pyemb_collect_if_alive(PyObject *model_ref)
{
    PyObject *host, *ret = NULL;

    if (PyWeakref_GetObject(model_ref) == Py_None) {
        return;
    }
    host = PyImport_ImportModule("pyemb.host");
    if (host) {
        ret = PyObject_CallMethod(host, "collect_cycles_soon", NULL);
    }
    if (!ret) {
        pyemb_report_exception("pyemb", "freeing a device model");
    }
    Py_XDECREF(ret);
    Py_XDECREF(host);
}

static void pyemb_drop_model(VirtIOPyemb *s)
{
    PyObject *model_ref = NULL;

    if (s->model) {
        model_ref = PyWeakref_NewRef(s->model, NULL);
        if (!model_ref) {
            PyErr_Clear();      /* a class without weak references */
        }
    }
    pyemb_revoke_shm_view(s);
    pyemb_device_handle_detach(s->handle);
    Py_CLEAR(s->dispatch);
    Py_CLEAR(s->model);
    Py_CLEAR(s->handle);
    if (model_ref) {
        pyemb_collect_if_alive(model_ref);
        Py_DECREF(model_ref);
    }
}

/*
 * QEMU 10's virtio_init() names the device from a table of device IDs that
 * ends at VIRTIO_ID_GPIO (41), with holes at 0, 14 and 15, and asserts on
 * an ID it lacks: virtio-media's 48 among them.  Such a device is
 * initialized under an ID of the table, then given its own ID, and its
 * type's name for messages.
 */
static void pyemb_virtio_init(VirtIOPyemb *s)
{
    VirtIODevice *vdev = VIRTIO_DEVICE(s);
    uint16_t id = s->device_id;

    if ((id >= VIRTIO_ID_NET && id <= VIRTIO_ID_MEMORY_BALLOON) ||
        (id >= VIRTIO_ID_GPU && id <= VIRTIO_ID_GPIO)) {
        virtio_init(vdev, id, s->config_size);
        return;
    }
    virtio_init(vdev, VIRTIO_ID_GPIO, s->config_size);
    vdev->device_id = id;
    vdev->name = pyemb_name(s);
}

static void pyemb_realize(DeviceState *dev, Error **errp)
{
    VirtIODevice *vdev = VIRTIO_DEVICE(dev);
    VirtIOPyemb *s = VIRTIO_PYEMB(dev);
    g_autofree uint16_t *queue_sizes = NULL;
    bool gil, ok;

    if (!pyemb_shm_check(s, errp) || !pyemb_python_start(errp)) {
        return;
    }
    QTAILQ_INIT(&s->live_requests);
    s->orphans = g_array_new(false, false, sizeof(PyembOrphan));
    QTAILQ_INIT(&s->mappings);
    QTAILQ_INIT(&s->deferred_unmaps);
    gil = pyemb_gil_acquire();
    ok = pyemb_create_model(s, &queue_sizes, errp);
    if (!ok) {
        if (s->model) {
            /* It may already hold threads or host devices. */
            Py_XDECREF(pyemb_call(s, "close", "()"));
        }
        pyemb_drop_model(s);
    }
    pyemb_gil_release(gil);
    if (!ok) {
        return;
    }

    qemu_mutex_init(&s->done_lock);
    QSIMPLEQ_INIT(&s->done);
    QSIMPLEQ_INIT(&s->unmaps);
    s->completion_bh = virtio_bh_new_guarded(dev, pyemb_completion_bh, s);
    pyemb_virtio_init(s);
    s->vqs = g_new(VirtQueue *, s->num_queues);
    for (unsigned i = 0; i < s->num_queues; i++) {
        s->vqs[i] = virtio_add_queue(vdev, queue_sizes[i],
                                     pyemb_handle_output);
    }
    pyemb_register_device(s);
    trace_pyemb_realize(pyemb_name(s), s->device_id, s->num_queues,
                        s->config_size);
}

static void pyemb_unrealize(DeviceState *dev)
{
    VirtIODevice *vdev = VIRTIO_DEVICE(dev);
    VirtIOPyemb *s = VIRTIO_PYEMB(dev);
    bool gil;

    if (pyemb_python_running()) {
        gil = pyemb_gil_acquire();
        s->dropping = true;
        Py_XDECREF(pyemb_call(s, "close", "()"));
        pyemb_drop_guest_state(s);
        pyemb_release_deferred_unmaps(s);
        pyemb_drop_model(s);
        pyemb_gil_release(gil);
    }
    pyemb_drop_queued_completions(s);
    qemu_bh_delete(s->completion_bh);
    for (unsigned i = 0; i < s->num_queues; i++) {
        virtio_delete_queue(s->vqs[i]);
    }
    g_clear_pointer(&s->vqs, g_free);
    virtio_cleanup(vdev);
    g_array_free(s->orphans, true);
    qemu_mutex_destroy(&s->done_lock);
    pyemb_unregister_device(s);
}

/* The state lives in Python and in host audio/video engines. */
static const VMStateDescription vmstate_pyemb = {
    .name = "virtio-pyemb",
    .unmigratable = 1,
};

static void pyemb_class_init(ObjectClass *klass, void *data)
{
    DeviceClass *dc = DEVICE_CLASS(klass);
    VirtioDeviceClass *vdc = VIRTIO_DEVICE_CLASS(klass);

    dc->vmsd = &vmstate_pyemb;
    vdc->realize = pyemb_realize;
    vdc->unrealize = pyemb_unrealize;
    vdc->get_config = pyemb_get_config;
    vdc->set_config = pyemb_set_config;
    vdc->get_features = pyemb_get_features;
    vdc->set_features = pyemb_set_features;
    vdc->set_status = pyemb_set_status;
    vdc->reset = pyemb_reset;
}

/* Each device type takes the first nprops: snd 2, video 3, media 4. */
static const Property pyemb_properties[] = {
    DEFINE_PROP_STRING("backend", VirtIOPyemb, backend),
    DEFINE_PROP_STRING("config", VirtIOPyemb, config),
    DEFINE_PROP_STRING("role", VirtIOPyemb, role),
    DEFINE_PROP_SIZE("shm-size", VirtIOPyemb, shm_size,
                     PYEMB_SHM_DEFAULT_SIZE),
};

/* What sets the device types apart: their TypeInfo's class_data. */
typedef struct PyembTypeData {
    const char *kind;
    const char *desc;
    size_t nprops;
    int category;
} PyembTypeData;

static void pyemb_type_class_init(ObjectClass *klass, void *data)
{
    const PyembTypeData *t = data;
    DeviceClass *dc = DEVICE_CLASS(klass);

    VIRTIO_PYEMB_CLASS(klass)->kind = t->kind;
    dc->desc = t->desc;
    device_class_set_props_n(dc, pyemb_properties, t->nprops);
    set_bit(t->category, dc->categories);
}

static const PyembTypeData pyemb_snd_data = {
    "snd", "pyemb virtio sound device (Python device model)", 2,
    DEVICE_CATEGORY_SOUND,
};

static const PyembTypeData pyemb_video_data = {
    "video", "pyemb virtio video decoder/encoder (Python device model)", 3,
    DEVICE_CATEGORY_MISC,
};

static const PyembTypeData pyemb_media_data = {
    "media", "pyemb virtio-media V4L2 device (Python device model)", 4,
    DEVICE_CATEGORY_MISC,
};

static const TypeInfo pyemb_types[] = {
    {
        .name = TYPE_VIRTIO_PYEMB,
        .parent = TYPE_VIRTIO_DEVICE,
        .instance_size = sizeof(VirtIOPyemb),
        .class_size = sizeof(VirtIOPyembClass),
        .instance_finalize = pyemb_instance_finalize,
        .class_init = pyemb_class_init,
        .abstract = true,
    }, {
        .name = TYPE_VIRTIO_SND_PY,
        .parent = TYPE_VIRTIO_PYEMB,
        .class_init = pyemb_type_class_init,
        .class_data = (void *)&pyemb_snd_data,
    }, {
        .name = TYPE_VIRTIO_VIDEO_PY,
        .parent = TYPE_VIRTIO_PYEMB,
        .class_init = pyemb_type_class_init,
        .class_data = (void *)&pyemb_video_data,
    }, {
        .name = TYPE_VIRTIO_MEDIA_PY,
        .parent = TYPE_VIRTIO_PYEMB,
        .class_init = pyemb_type_class_init,
        .class_data = (void *)&pyemb_media_data,
    },
};

DEFINE_TYPES(pyemb_types)
module_obj(TYPE_VIRTIO_SND_PY);
module_obj(TYPE_VIRTIO_VIDEO_PY);
module_obj(TYPE_VIRTIO_MEDIA_PY);
module_kconfig(PYEMB);
