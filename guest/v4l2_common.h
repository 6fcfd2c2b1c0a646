/*
 * v4l2_common.h: what the test guest's two V4L2 clients, pyemb-v4l2-decode
 * (v4l2_decode.c) and pyemb-v4l2-encode (v4l2_encode.c), share
 *
 * Messages, the ioctl wrappers, finding a node, the MMAP buffer queues (both
 * APIs, one memory plane per buffer), the poll() of the node, the 4:2:0
 * plane layouts, the command-line and file helpers.  Static functions, so
 * that each client stays one gcc command:
 *
 *   gcc -static -O2 -Wall -Wextra -Werror -o pyemb-v4l2-decode v4l2_decode.c
 *
 * (the client finds this header beside it).  Each one defines PROG, its
 * name in messages, before including it.  Inline so that a client that does
 * not use one of them is not warned about it.
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#ifndef PYEMB_V4L2_COMMON_H
#define PYEMB_V4L2_COMMON_H

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <linux/videodev2.h>

#ifndef PROG
#error "define PROG, the program's name in messages, before including v4l2_common.h"
#endif

#define MAX_BUFFERS 64
#define MAX_PLANES 3                /* Y, U, V */
#define IDLE_TIMEOUT_MS 20000       /* nothing at all happened: fail, do not hang */

/* ---- messages and ioctls ---- */

static inline void message(const char *prefix, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* A line on stderr: PROG, the prefix ("", "warning: ", "error: "), the text. */
static inline void message(const char *prefix, const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, PROG ": %s", prefix);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

#define note(...) message("", __VA_ARGS__)
#define warning(...) message("warning: ", __VA_ARGS__)
#define error(...) message("error: ", __VA_ARGS__)

/* A fourcc as text, e.g. "NV12"; the buffer must hold 5 bytes. */
static inline const char *fourcc_str(uint32_t f, char *s)
{
    for (int i = 0; i < 4; i++) {
        unsigned c = (f >> (8 * i)) & 0xff;
        s[i] = (c >= 32 && c < 127) ? (char)c : '?';
    }
    s[4] = '\0';
    return s;
}

static inline int xioctl(int fd, unsigned long request, void *arg)
{
    int r;

    do {
        r = ioctl(fd, request, arg);
    } while (r < 0 && errno == EINTR);
    return r;
}

/* An ioctl that must succeed; on failure it says which one, on what, and why. */
#define IOCTL(fd, request, arg, what) checked_ioctl(fd, request, #request, arg, what)

static inline int checked_ioctl(int fd, unsigned long request, const char *name,
                                void *arg, const char *what)
{
    if (xioctl(fd, request, arg) == 0) {
        return 0;
    }
    error("%s (%s) failed: %s (errno %d)", name, what, strerror(errno), errno);
    return -1;
}

/* ---- time ---- */

/* A buffer's timestamp in microseconds. */
static inline uint64_t buffer_timestamp_us(const struct v4l2_buffer *v)
{
    return (uint64_t)v->timestamp.tv_sec * 1000000 + (uint64_t)v->timestamp.tv_usec;
}

/* Seconds from `from` to `to` (CLOCK_MONOTONIC readings). */
static inline double seconds_between(const struct timespec *from, const struct timespec *to)
{
    return (double)(to->tv_sec - from->tv_sec) + (to->tv_nsec - from->tv_nsec) / 1e9;
}

/* ---- files and the command line ---- */

/* The little-endian 32-bit numbers of the frames files ("PYF1"). */
static inline uint32_t le32(const uint8_t *p)
{
    return p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline void put_le32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

/* Opens an input file and reads its size: the fd, or -1 (said). */
static inline int open_input(const char *path, struct stat *st)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);

    if (fd < 0 || fstat(fd, st) < 0) {
        error("cannot read %s: %s", path, strerror(errno));
        if (fd >= 0) {
            close(fd);
        }
        return -1;
    }
    return fd;
}

/* A decimal number >= 0: 0, or -1 if s is not one. */
static inline int parse_number(const char *s, long *v)
{
    char *end;

    errno = 0;
    *v = strtol(s, &end, 10);
    return (errno || end == s || *end || *v < 0) ? -1 : 0;
}

/* --format NV12|YU12. */
static inline int parse_format(const char *s, uint32_t *fourcc)
{
    if (strcmp(s, "NV12") == 0) {
        *fourcc = V4L2_PIX_FMT_NV12;
    } else if (strcmp(s, "YU12") == 0) {
        *fourcc = V4L2_PIX_FMT_YUV420;
    } else {
        return -1;
    }
    return 0;
}

/* ---- picture formats and layouts (NV12 and YU12, one memory plane) ---- */

/*
 * A raw picture format as the driver reports it (one memory plane), and
 * the part of it that is the picture: all of it, unless the decoder names a
 * visible rectangle (the encoder's pictures fill it from the top left).
 */
struct pic_format {
    uint32_t fourcc;
    uint32_t width, height;         /* coded size */
    uint32_t bytesperline;          /* luma stride; chroma strides derive from it */
    uint32_t sizeimage;
    uint32_t num_planes;            /* memory planes */
    struct v4l2_rect visible;
};

/* A G_FMT or S_FMT answer, through either API (f->type says which). */
static inline struct pic_format pic_format_from(const struct v4l2_format *f)
{
    struct pic_format pf = { 0 };

    if (V4L2_TYPE_IS_MULTIPLANAR(f->type)) {
        const struct v4l2_pix_format_mplane *mp = &f->fmt.pix_mp;
        pf = (struct pic_format){ mp->pixelformat, mp->width, mp->height,
                                  mp->plane_fmt[0].bytesperline,
                                  mp->plane_fmt[0].sizeimage, mp->num_planes, { 0 } };
    } else {
        const struct v4l2_pix_format *sp = &f->fmt.pix;
        pf = (struct pic_format){ sp->pixelformat, sp->width, sp->height,
                                  sp->bytesperline, sp->sizeimage, 1, { 0 } };
    }
    pf.visible = (struct v4l2_rect){ 0, 0, pf.width, pf.height };
    return pf;
}

/* One plane of a picture: where its rows start, how far apart, how long. */
struct plane_span {
    size_t offset, stride, row_bytes, rows;
};

/* Bytes of V4L2's 4:2:0 layout with `rows` luma rows of stride bpl. */
static inline uint64_t layout_bytes(uint32_t fourcc, uint64_t bpl, uint64_t rows)
{
    uint64_t chroma_rows = (rows + 1) / 2;

    if (fourcc == V4L2_PIX_FMT_NV12) {
        return bpl * rows + bpl * chroma_rows;
    }
    return bpl * rows + 2 * ((bpl + 1) / 2) * chroma_rows;
}

/*
 * The planes of a w x h picture at (left, top) in a frame buffer with the
 * luma stride bpl and a luma plane of `rows` rows: Y at 0; NV12's
 * interleaved CbCr right after the luma plane with the same stride; YU12's
 * Cb there and Cr one chroma plane ((rows + 1) / 2 rows) further, with half
 * the stride (rounded up, as V4L2 does).  Each chroma plane has (h + 1) / 2
 * rows of the picture; NV12's chroma rows are w rounded up to even (a whole
 * CbCr pair per pixel pair), YU12's (w + 1) / 2.
 */
static inline unsigned frame_planes(uint32_t fourcc, size_t bpl, size_t rows, size_t left,
                                    size_t top, size_t w, size_t h,
                                    struct plane_span p[MAX_PLANES])
{
    size_t luma = bpl * rows, chroma_rows = (h + 1) / 2;

    p[0] = (struct plane_span){ top * bpl + left, bpl, w, h };
    if (fourcc == V4L2_PIX_FMT_NV12) {
        p[1] = (struct plane_span){ luma + top / 2 * bpl + (left & ~(size_t)1),
                                    bpl, (w + 1) & ~(size_t)1, chroma_rows };
        return 2;
    }
    size_t cbpl = (bpl + 1) / 2, cplane = cbpl * ((rows + 1) / 2);
    size_t coff = top / 2 * cbpl + left / 2, cw = (w + 1) / 2;
    p[1] = (struct plane_span){ luma + coff, cbpl, cw, chroma_rows };
    p[2] = (struct plane_span){ luma + cplane + coff, cbpl, cw, chroma_rows };
    return 3;
}

/* The planes of a packed w x h picture of `fourcc`: rows back to back. */
static inline unsigned packed_planes(uint32_t fourcc, uint32_t w, uint32_t h,
                                     struct plane_span p[MAX_PLANES])
{
    size_t luma = (size_t)w * h, chroma_rows = ((size_t)h + 1) / 2;

    p[0] = (struct plane_span){ 0, w, w, h };
    if (fourcc == V4L2_PIX_FMT_NV12) {
        size_t row = ((size_t)w + 1) & ~(size_t)1;
        p[1] = (struct plane_span){ luma, row, row, chroma_rows };
        return 2;
    }
    size_t cw = ((size_t)w + 1) / 2;
    p[1] = (struct plane_span){ luma, cw, cw, chroma_rows };
    p[2] = (struct plane_span){ luma + cw * chroma_rows, cw, cw, chroma_rows };
    return 3;
}

/* Bytes from the start of the buffer to the end of the last row of the planes. */
static inline size_t planes_extent(const struct plane_span *p, unsigned n)
{
    size_t end = 0;

    for (unsigned i = 0; i < n; i++) {
        size_t e = p[i].rows ? p[i].offset + (p[i].rows - 1) * p[i].stride + p[i].row_bytes
                             : p[i].offset;
        end = e > end ? e : end;
    }
    return end;
}

/* Copies each plane's rows from src (in layout s) to dst (in layout d). */
static inline void copy_picture(const struct plane_span *d, const struct plane_span *s,
                                unsigned n, uint8_t *dst, const uint8_t *src)
{
    for (unsigned i = 0; i < n; i++) {
        for (size_t r = 0; r < s[i].rows; r++) {
            memcpy(dst + d[i].offset + r * d[i].stride, src + s[i].offset + r * s[i].stride,
                   s[i].row_bytes);
        }
    }
}

/* The self-tests' picture: a byte for each plane, row and column. */
static inline uint8_t pattern(unsigned plane, size_t row, size_t col)
{
    return (uint8_t)((plane * 101 + row * 31 + col * 7 + 3) & 0xff);
}

/* ---- finding the node ---- */

/* QUERYCAP, and the node's capabilities (device_caps where there are some). */
static inline int query_caps(int fd, struct v4l2_capability *cap, uint32_t *caps)
{
    memset(cap, 0, sizeof(*cap));
    if (xioctl(fd, VIDIOC_QUERYCAP, cap) < 0) {
        return -1;
    }
    *caps = (cap->capabilities & V4L2_CAP_DEVICE_CAPS) ? cap->device_caps : cap->capabilities;
    return 0;
}

/*
 * Whether ENUM_FMT on queue `type` lists fourcc.  With `offered`, which holds
 * `size` bytes, it also gets the fourccs listed before, each after a space.
 */
static inline bool offers_format(int fd, enum v4l2_buf_type type, uint32_t fourcc,
                                 char *offered, size_t size)
{
    struct v4l2_fmtdesc desc = { .type = type };
    char s[5];

    if (offered) {
        offered[0] = '\0';
    }
    for (desc.index = 0; desc.index < 64 && xioctl(fd, VIDIOC_ENUM_FMT, &desc) == 0;
         desc.index++) {
        if (desc.pixelformat == fourcc) {
            return true;
        }
        if (offered) {
            size_t used = strlen(offered);
            snprintf(offered + used, size - used, " %s", fourcc_str(desc.pixelformat, s));
        }
    }
    return false;
}

/*
 * Opens the node at path and keeps it if wanted(fd, ctx) says so: the fd,
 * else -1 with errno set (ENODEV where it was not wanted).  Non-blocking:
 * DQBUF and DQEVENT say "nothing" instead of waiting.
 */
static inline int open_node(const char *path, bool (*wanted)(int fd, void *ctx), void *ctx)
{
    int fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC);

    if (fd >= 0 && !wanted(fd, ctx)) {
        close(fd);
        errno = ENODEV;
        return -1;
    }
    return fd;
}

/* The first /dev/videoN that open_node() keeps (noted), or -1. */
static inline int find_node(bool (*wanted)(int fd, void *ctx), void *ctx)
{
    char path[32];

    for (int i = 0; i < 64; i++) {
        snprintf(path, sizeof(path), "/dev/video%d", i);
        int fd = open_node(path, wanted, ctx);
        if (fd >= 0) {
            note("using %s", path);
            return fd;
        }
    }
    return -1;
}

/* ---- buffer queues: MMAP, one memory plane per buffer, either API ---- */

struct buffer {
    uint8_t *mem;
    size_t length;
    bool queued;                    /* owned by the driver */
};

struct queue {
    enum v4l2_buf_type type;        /* the API follows: multi-planar or not */
    const char *name;               /* "OUTPUT" or "CAPTURE", for messages */
    struct buffer bufs[MAX_BUFFERS];
    unsigned count;
    unsigned queued;
    bool streaming;
};

/* A v4l2_buffer for buffer `index` of q, with its one plane when multi-planar. */
static inline void buffer_init(const struct queue *q, unsigned index,
                               struct v4l2_buffer *v, struct v4l2_plane *plane)
{
    memset(v, 0, sizeof(*v));
    memset(plane, 0, sizeof(*plane));
    v->type = q->type;
    v->memory = V4L2_MEMORY_MMAP;
    v->index = index;
    if (V4L2_TYPE_IS_MULTIPLANAR(q->type)) {
        v->m.planes = plane;
        v->length = 1;
    }
}

static inline uint32_t buffer_bytesused(const struct v4l2_buffer *v)
{
    return V4L2_TYPE_IS_MULTIPLANAR(v->type) ? v->m.planes[0].bytesused : v->bytesused;
}

static inline int map_buffer(int fd, struct queue *q, unsigned i)
{
    struct v4l2_buffer v;
    struct v4l2_plane plane;
    bool mplane = V4L2_TYPE_IS_MULTIPLANAR(q->type);
    int prot = V4L2_TYPE_IS_OUTPUT(q->type) ? PROT_READ | PROT_WRITE : PROT_READ;

    buffer_init(q, i, &v, &plane);
    if (IOCTL(fd, VIDIOC_QUERYBUF, &v, q->name)) {
        return -1;
    }
    size_t length = mplane ? plane.length : v.length;
    off_t offset = mplane ? plane.m.mem_offset : v.m.offset;
    void *mem = mmap(NULL, length, prot, MAP_SHARED, fd, offset);
    if (mem == MAP_FAILED) {
        error("mmap of %s buffer %u failed: %s", q->name, i, strerror(errno));
        return -1;
    }
    q->bufs[i] = (struct buffer){ mem, length, false };
    return 0;
}

/* REQBUFS(count, MMAP) and map every buffer. */
static inline int allocate_buffers(int fd, struct queue *q, unsigned count)
{
    struct v4l2_requestbuffers rb = { .count = count, .type = q->type,
                                      .memory = V4L2_MEMORY_MMAP };

    if (IOCTL(fd, VIDIOC_REQBUFS, &rb, q->name)) {
        return -1;
    }
    if (rb.count == 0 || rb.count > MAX_BUFFERS) {
        error("REQBUFS(%s) gave %u buffers", q->name, rb.count);
        return -1;
    }
    q->count = 0;
    for (unsigned i = 0; i < rb.count; i++) {
        if (map_buffer(fd, q, i)) {
            return -1;
        }
        q->count++;
    }
    q->queued = 0;
    return 0;
}

/* Unmap every buffer and REQBUFS(0). */
static inline int free_buffers(int fd, struct queue *q)
{
    struct v4l2_requestbuffers rb = { .count = 0, .type = q->type,
                                      .memory = V4L2_MEMORY_MMAP };

    for (unsigned i = 0; i < q->count; i++) {
        munmap(q->bufs[i].mem, q->bufs[i].length);
    }
    q->count = 0;
    q->queued = 0;
    return IOCTL(fd, VIDIOC_REQBUFS, &rb, q->name);
}

static inline int queue_buffer(int fd, struct queue *q, unsigned i,
                               uint32_t bytesused, uint64_t timestamp_us)
{
    struct v4l2_buffer v;
    struct v4l2_plane plane;

    buffer_init(q, i, &v, &plane);
    if (V4L2_TYPE_IS_MULTIPLANAR(q->type)) {
        plane.bytesused = bytesused;
    } else {
        v.bytesused = bytesused;
    }
    v.timestamp.tv_sec = (time_t)(timestamp_us / 1000000);
    v.timestamp.tv_usec = (suseconds_t)(timestamp_us % 1000000);
    if (IOCTL(fd, VIDIOC_QBUF, &v, q->name)) {
        return -1;
    }
    q->bufs[i].queued = true;
    q->queued++;
    return 0;
}

/* One done buffer of q into v: 1 if there was one, 0 if none, -1 on error. */
static inline int dequeue_buffer(int fd, struct queue *q,
                                 struct v4l2_buffer *v, struct v4l2_plane *plane)
{
    buffer_init(q, 0, v, plane);
    if (xioctl(fd, VIDIOC_DQBUF, v) < 0) {
        if (errno == EAGAIN) {
            return 0;
        }
        error("VIDIOC_DQBUF (%s) failed: %s (errno %d)", q->name, strerror(errno), errno);
        return -1;
    }
    if (v->index >= q->count) {
        error("VIDIOC_DQBUF (%s) gave buffer %u of %u", q->name, v->index, q->count);
        return -1;
    }
    q->bufs[v->index].queued = false;
    q->queued--;
    return 1;
}

/* The first buffer of q that we hold, or -1. */
static inline int free_buffer(const struct queue *q)
{
    for (unsigned i = 0; i < q->count; i++) {
        if (!q->bufs[i].queued) {
            return (int)i;
        }
    }
    return -1;
}

static inline int stream(int fd, struct queue *q, bool on)
{
    int type = q->type;

    if (on ? IOCTL(fd, VIDIOC_STREAMON, &type, q->name)
           : IOCTL(fd, VIDIOC_STREAMOFF, &type, q->name)) {
        return -1;
    }
    q->streaming = on;
    if (!on) {
        /* STREAMOFF hands every buffer back to us. */
        for (unsigned i = 0; i < q->count; i++) {
            q->bufs[i].queued = false;
        }
        q->queued = 0;
    }
    return 0;
}

/* V4L2_CID_MIN_BUFFERS_FOR_OUTPUT or _CAPTURE: its value, or 1 (noted). */
#define MIN_BUFFERS(fd, id) min_buffers(fd, id, #id)

static inline unsigned min_buffers(int fd, uint32_t id, const char *name)
{
    struct v4l2_control ctrl = { .id = id };

    if (xioctl(fd, VIDIOC_G_CTRL, &ctrl) < 0 || ctrl.value < 1) {
        note("no %s: assuming 1", name);
        return 1;
    }
    return (unsigned)ctrl.value;
}

/* ---- events and the poll() loop ---- */

static inline int subscribe(int fd, uint32_t type, const char *name)
{
    struct v4l2_event_subscription sub = { .type = type };

    return IOCTL(fd, VIDIOC_SUBSCRIBE_EVENT, &sub, name);
}

/*
 * Takes back the done buffers of the OUTPUT queue q.  One that came back with
 * ERROR is said: as an error, counted in *errors, where errors is given, else
 * as a note.  0, or -1 on a failure.
 */
static inline int dequeue_output(int fd, struct queue *q, unsigned long *errors)
{
    struct v4l2_buffer v;
    struct v4l2_plane plane;
    int got;

    while ((got = dequeue_buffer(fd, q, &v, &plane)) > 0) {
        if (v.flags & V4L2_BUF_FLAG_ERROR) {
            message(errors ? "error: " : "",
                    "OUTPUT buffer of timestamp %ld.%06ld came back with ERROR",
                    (long)v.timestamp.tv_sec, (long)v.timestamp.tv_usec);
            if (errors) {
                (*errors)++;
            }
        }
    }
    return got;
}

/* One pending event into ev: 1 if there was one, 0 if none, -1 on error. */
static inline int dequeue_event(int fd, struct v4l2_event *ev)
{
    if (xioctl(fd, VIDIOC_DQEVENT, ev) == 0) {
        return 1;
    }
    if (errno == ENOENT) {
        return 0;
    }
    error("VIDIOC_DQEVENT failed: %s (errno %d)", strerror(errno), errno);
    return -1;
}

/* What to poll the node for, given its queues and whether LAST came back. */
static inline short poll_events(const struct queue *out, const struct queue *cap,
                                bool last_dequeued)
{
    short events = POLLPRI;

    /* Ask only about queues that hold buffers: for idle ones the m2m poll says POLLERR. */
    if (out->queued > 0) {
        events |= POLLOUT;
    }
    if (cap->streaming && !last_dequeued) {
        events |= POLLIN;
    }
    return events;
}

#define POLL_IDLE 2

/*
 * One poll() of the node, for up to IDLE_TIMEOUT_MS: 1 with *revents set;
 * 0 if a signal came first (poll again); -1 on a failure or POLLERR (said);
 * POLL_IDLE if nothing at all happened (the caller says what it waited for).
 */
static inline int poll_node(int fd, short events, short *revents)
{
    struct pollfd p = { .fd = fd, .events = events };
    int n = poll(&p, 1, IDLE_TIMEOUT_MS);

    if (n < 0) {
        if (errno == EINTR) {
            return 0;
        }
        error("poll failed: %s", strerror(errno));
        return -1;
    }
    if (n == 0) {
        return POLL_IDLE;
    }
    if (p.revents & POLLERR) {
        error("poll says POLLERR: the driver failed the queues (a device error?)");
        return -1;
    }
    *revents = p.revents;
    return 1;
}

#endif /* PYEMB_V4L2_COMMON_H */
