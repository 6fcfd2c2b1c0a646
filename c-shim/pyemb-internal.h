/*
 * pyemb: virtio devices whose behaviour is a Python device model
 *
 * Internal interfaces shared by the files of hw/pyemb.
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#ifndef HW_PYEMB_INTERNAL_H
#define HW_PYEMB_INTERNAL_H

/*
 * Python.h must come after qemu/osdep.h (QEMU's rule) and before anything
 * that uses Py* names; the feature macros it sets agree with QEMU's.
 */
#define PY_SSIZE_T_CLEAN
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wredundant-decls"
#pragma GCC diagnostic ignored "-Wstrict-prototypes"
#include <Python.h>
#pragma GCC diagnostic pop

#include "exec/memory.h"
#include "hw/virtio/virtio.h"
#include "qemu/queue.h"
#include "qemu/rcu.h"
#include "qemu/thread.h"
#include "qemu/units.h"

#define TYPE_VIRTIO_PYEMB "virtio-pyemb-device"
#define TYPE_VIRTIO_SND_PY "virtio-snd-py"
#define TYPE_VIRTIO_VIDEO_PY "virtio-video-py"
#define TYPE_VIRTIO_MEDIA_PY "virtio-media-py"

/* virtio-media: MMAP buffers live in shared memory region 0 */
#define PYEMB_SHM_ID 0
#define PYEMB_SHM_DEFAULT_SIZE (256 * MiB)

OBJECT_DECLARE_TYPE(VirtIOPyemb, VirtIOPyembClass, VIRTIO_PYEMB)

struct VirtIOPyembClass {
    VirtioDeviceClass parent_class;
    /* Which bundled device model pyemb.host builds: "snd", "video", "media". */
    const char *kind;
};

typedef struct PyembRequest PyembRequest;
typedef struct PyembMapping PyembMapping;

/* An element completed from a thread that does not hold the BQL. */
typedef struct PyembDone {
    VirtQueueElement *elem;
    unsigned queue_index;
    uint32_t written;
    QSIMPLEQ_ENTRY(PyembDone) next;
} PyembDone;

/*
 * The host memory of a shared memory region.  The device holds one
 * reference until it is finalized (dropped after an RCU grace period, when
 * no flat view or TCG TLB can reach it), the Python exporter of its view
 * another (dropped when the last view derived from it is freed): a view a
 * model keeps past the unplug reads stale bytes, never unmapped memory.
 */
typedef struct PyembShm {
    struct rcu_head rcu;        /* first: call_rcu() wants it there */
    void *ptr;
    uint64_t size;
    int refs;                   /* atomic */
} PyembShm;

/* A guest mapping released without the BQL: unmapped by the main loop. */
typedef struct PyembUnmap {
    void *ptr;
    hwaddr len;
    bool writable;
    QSIMPLEQ_ENTRY(PyembUnmap) next;
} PyembUnmap;

struct VirtIOPyemb {
    VirtIODevice parent_obj;

    /* Properties */
    char *backend;
    char *config;
    char *role;
    uint64_t shm_size;          /* virtio-media-py only; 0: no region */

    /* Shape, from the Python device model at realize */
    uint16_t device_id;
    uint32_t config_size;
    uint64_t model_features;
    unsigned num_queues;
    VirtQueue **vqs;

    /*
     * Shared memory region 0, created by the PCI proxy before this device
     * is realized (virtio-mmio has no shared memory regions); shm_mr is
     * what the proxy's BAR 4 maps.
     */
    PyembShm *shm;
    MemoryRegion shm_mr;

    /* Python side; touched only with the GIL held */
    PyObject *model;            /* the device model */
    PyObject *handle;           /* the _pyemb.Device handed to the model */
    PyObject *dispatch;         /* bound model.handle_request */
    PyObject *shm_view;         /* handle.shared_memory, made on first use */
    PyObject *shm_region;       /* its exporter */
    QTAILQ_HEAD(, PyembRequest) live_requests;
    QTAILQ_HEAD(, PyembMapping) mappings;
    /* Released mappings whose views are still exported (pyemb-module.c) */
    QTAILQ_HEAD(, PyembRegion) deferred_unmaps;
    bool warned_kept_views;
    bool dropping;              /* in model.reset()/close(): drops are fine */
    /*
     * Elements of requests another thread freed while the dropping thread
     * (which holds the BQL) had let the GIL go: that thread detaches them
     * when the model's reset or close returns.  PyembOrphan entries.
     */
    GArray *orphans;

    /*
     * Completions from threads without the BQL, pushed by completion_bh
     * or, at the end of a completion batch, by the completing thread
     */
    QemuMutex done_lock;
    QSIMPLEQ_HEAD(, PyembDone) done;
    QSIMPLEQ_HEAD(, PyembUnmap) unmaps;
    QEMUBH *completion_bh;
    bool config_changed;        /* under done_lock */

    QTAILQ_ENTRY(VirtIOPyemb) next;     /* all realized pyemb devices */
};

/* pyemb-interp.c: the one interpreter of this QEMU process */
bool pyemb_python_start(Error **errp);
bool pyemb_python_running(void);
bool pyemb_gil_acquire(void);
void pyemb_gil_release(bool acquired);
void pyemb_report_exception(const char *who, const char *what);
char *pyemb_exception_line(void);
void pyemb_register_device(VirtIOPyemb *s);
void pyemb_unregister_device(VirtIOPyemb *s);

/* pyemb-module.c: the _pyemb extension module (GIL held for all of these) */
PyObject *pyemb_module_init(void);
PyObject *pyemb_device_handle_new(VirtIOPyemb *s);
void pyemb_device_handle_detach(PyObject *handle);
PyObject *pyemb_request_new(VirtIOPyemb *s, unsigned queue_index,
                            VirtQueueElement *elem);
bool pyemb_request_finish(PyObject *request, uint32_t written);
typedef struct PyembOrphan {
    unsigned queue_index;
    VirtQueueElement *elem;
} PyembOrphan;

unsigned pyemb_cancel_requests(VirtIOPyemb *s);
void pyemb_cancel_request(PyembRequest *req);
void pyemb_release_mappings(VirtIOPyemb *s);
void pyemb_release_deferred_unmaps(VirtIOPyemb *s);
void pyemb_unmap_guest(VirtIOPyemb *s, void *ptr, hwaddr len, bool writable);
void pyemb_queue_unmap(VirtIOPyemb *s, void *ptr, hwaddr len, bool writable);
void pyemb_revoke_shm_view(VirtIOPyemb *s);

/* virtio-pyemb.c */
void pyemb_push_element(VirtIOPyemb *s, unsigned queue_index,
                        VirtQueueElement *elem, uint32_t written);
void pyemb_queue_completion(VirtIOPyemb *s, unsigned queue_index,
                            VirtQueueElement *elem, uint32_t written,
                            bool schedule);
void pyemb_push_completions_from_thread(VirtIOPyemb *s);
void pyemb_request_config_notify(VirtIOPyemb *s);
bool pyemb_shm_create(VirtIOPyemb *s, Error **errp);
void pyemb_shm_ref(PyembShm *shm);
void pyemb_shm_unref(PyembShm *shm);
int pyemb_shm_discard(PyembShm *shm, uint64_t offset, uint64_t length);

struct PyembRequest {
    PyObject_HEAD
    VirtIOPyemb *dev;           /* NULL once completed or cancelled */
    VirtQueueElement *elem;
    unsigned queue_index;
    PyObject *readable;         /* tuple of memoryview */
    PyObject *writable;         /* tuple of memoryview */
    PyObject *regions;          /* tuple of the exporters behind them */
    size_t readable_size;
    size_t writable_size;
    bool finished;              /* completed or cancelled */
    bool cancelled;             /* dropped by a device reset */
    QTAILQ_ENTRY(PyembRequest) next;
};

#endif
