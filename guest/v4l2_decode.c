/*
 * pyemb-v4l2-decode: a small V4L2 stateful-decoder client for the test guest
 *
 * It feeds a coded stream, one access unit per OUTPUT buffer, to a V4L2
 * memory-to-memory decoder node and prints one line per decoded picture with
 * a CRC-32 of its visible pixels, so that the host can compare the guest's
 * pictures with PyAV's.  It follows the kernel's stateful decoder interface
 * (Documentation/userspace-api/media/v4l/dev-decoder.rst):
 *
 *   Initialization  S_FMT(OUTPUT, coded format), REQBUFS(OUTPUT),
 *                   SUBSCRIBE_EVENT(SOURCE_CHANGE, EOS), STREAMON(OUTPUT),
 *                   queue records until V4L2_EVENT_SOURCE_CHANGE.
 *   Capture setup   G_FMT/S_FMT(CAPTURE), G_SELECTION(COMPOSE),
 *                   V4L2_CID_MIN_BUFFERS_FOR_CAPTURE, REQBUFS(CAPTURE),
 *                   QBUF all, STREAMON(CAPTURE).
 *   Decoding        one poll() loop: refill OUTPUT, print and requeue CAPTURE,
 *                   dequeue events.
 *   Seek            STREAMOFF + STREAMON(OUTPUT), feed from the keyframe.
 *   Resolution      SOURCE_CHANGE mid-stream: take the old pictures, then
 *   change          STREAMOFF(CAPTURE), REQBUFS 0, capture setup again.
 *   Drain           V4L2_DEC_CMD_STOP, dequeue CAPTURE up to the buffer with
 *                   V4L2_BUF_FLAG_LAST.
 *
 * Facts about the ChromeOS virtio-video guest driver (driver name
 * "virtio-video") that shape this program:
 *   - it offers only the multi-planar API (V4L2_CAP_VIDEO_M2M_MPLANE); NV12
 *     and YU12 come as one memory plane, Y then chroma, sizeimage being the
 *     sum of the device's plane sizes;
 *   - on a resolution change it queues SOURCE_CHANGE but never marks a
 *     CAPTURE buffer LAST: see on_source_change();
 *   - V4L2_DEC_CMD_STOP sends the drain to the device at once, while OUTPUT
 *     buffers queued just before may still wait in its m2m queue; those are
 *     never sent, and their pictures are lost.  So by default the STOP waits
 *     until every OUTPUT buffer is back (--stop-early shows the race);
 *   - DEC_CMD_STOP is ignored unless both queues stream;
 *   - the drain ends with an empty (bytesused 0) CAPTURE buffer marked LAST,
 *     plus a V4L2_EVENT_EOS.
 * Both APIs (single- and multi-planar) are supported, with one memory plane
 * per buffer: that is what coded formats, NV12 and YU12 need.
 *
 * Input file: "PYF1", le32 coded fourcc, le32 width, le32 height (hints for
 * the OUTPUT format), then records of le32 length + that many bytes.
 * Record i is queued with timestamp i * 40000 us, so a picture's timestamp
 * names the record it came from.
 *
 * Output on stdout, one line each, flushed at once (the host may kill us):
 *   FRAME <index> <timestamp_us> <crc32 as 8 hex digits>
 *       the CRC (zlib's) of the visible picture packed without padding:
 *       NV12 Y rows then CbCr rows, YU12 Y then Cb then Cr; an empty LAST
 *       buffer is no picture; index counts pictures from 0
 *   RESCHANGE <width>x<height>      before the first picture of a new size
 *   SEEK <N> <M>                     once the seek is done
 *   DONE pictures=<n> rc=<0|1> seconds=<from opening the node to the end>
 * Everything else (progress, errors) goes to stderr.
 *
 * Build: gcc -static -O2 -Wall -Wextra -Werror -o pyemb-v4l2-decode v4l2_decode.c
 * (with v4l2_common.h beside it: what it shares with pyemb-v4l2-encode)
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include <getopt.h>
#include <inttypes.h>

#define PROG "pyemb-v4l2-decode"
#include "v4l2_common.h"

#define OUTPUT_BUFFERS 8            /* bitstream buffers in flight */
#define OUTPUT_MIN_SIZEIMAGE (1u << 20)
#define CAPTURE_EXTRA 4             /* beyond the decoder's minimum: slack for us */
#define RECORD_STEP_US 40000        /* timestamp of record i: i * RECORD_STEP_US */

/* One access unit of the input file. */
struct record {
    const uint8_t *data;
    uint32_t size;
};

struct frames_file {
    uint8_t *bytes;
    uint32_t fourcc, width, height;
    struct record *records;
    unsigned count;
    uint32_t largest;
};

struct options {
    const char *device;
    const char *frames_path;
    const char *dump_path;
    uint32_t capture_fourcc;
    bool stop_early;
    long seek_at, seek_to;          /* -1: no seek */
    long max_frames;                /* 0: no limit */
    bool unread;                    /* --unread: never touch the pictures */
    bool summary;                   /* --summary: no FRAME lines */
};

struct decoder {
    struct options opt;
    struct frames_file in;
    int fd;
    bool mplane;
    bool reschange_marks_last;      /* false for virtio-video: see on_source_change() */
    struct queue out, cap;
    struct pic_format fmt;          /* CAPTURE format of the buffers in use */
    struct pic_format next_fmt;     /* the format the decoder moved to... */
    bool have_next_fmt;             /* ...before our buffers were set up for it */
    uint8_t *packed;                /* one packed picture */
    size_t packed_capacity;
    FILE *dump;
    unsigned next_record;
    bool seek_done, stop_sent, eos_event;
    bool reschange_pending;         /* SOURCE_CHANGE seen, waiting for LAST */
    bool last_dequeued;             /* LAST seen, SOURCE_CHANGE not yet */
    bool finished;
    uint32_t shown_width, shown_height; /* geometry of the pictures printed */
    unsigned long pictures;
};

/* ---- CRC-32 (IEEE 802.3, as zlib.crc32) ---- */

static uint32_t crc_table[256];

static void crc32_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) {
            c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
        }
        crc_table[n] = c;
    }
}

static uint32_t crc32_update(uint32_t crc, const uint8_t *p, size_t n)
{
    crc = ~crc;
    while (n--) {
        crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    }
    return ~crc;
}

/* ---- picture packing ---- */

/*
 * The visible part of each plane of a picture in format f, in V4L2's
 * single-buffer layout: the luma plane is bytesperline * height bytes, then
 * NV12's interleaved CbCr plane with the same stride, or YU12's Cb then Cr
 * planes with half the stride and half the rows (rounded up).  The packed
 * picture is these spans' rows back to back (packed_planes()): NV12 chroma
 * rows are the visible width rounded up to even (a whole CbCr pair per pixel
 * pair).
 */
static unsigned visible_planes(const struct pic_format *f, struct plane_span p[MAX_PLANES])
{
    return frame_planes(f->fourcc, f->bytesperline, f->height, (size_t)f->visible.left,
                        (size_t)f->visible.top, f->visible.width, f->visible.height, p);
}

static size_t packed_size(const struct pic_format *f)
{
    struct plane_span p[MAX_PLANES];
    unsigned n = packed_planes(f->fourcc, f->visible.width, f->visible.height, p);

    return planes_extent(p, n);
}

/* Bytes of the whole frame in V4L2's layout: what sizeimage should be. */
static size_t layout_size(const struct pic_format *f)
{
    return (size_t)layout_bytes(f->fourcc, f->bytesperline, f->height);
}

/* How many bytes of a buffer packing reads: it must not exceed its length. */
static size_t packed_extent(const struct pic_format *f)
{
    struct plane_span p[MAX_PLANES];
    unsigned n = visible_planes(f, p);

    return planes_extent(p, n);
}

static void pack_picture(const struct pic_format *f, const uint8_t *buf, uint8_t *out)
{
    struct plane_span visible[MAX_PLANES], packed[MAX_PLANES];
    unsigned n = visible_planes(f, visible);

    packed_planes(f->fourcc, f->visible.width, f->visible.height, packed);
    copy_picture(packed, visible, n, out, buf);
}

/* ---- the input file ---- */

static int read_whole_file(const char *path, uint8_t **bytes, size_t *len)
{
    struct stat st;
    int fd = open_input(path, &st);
    size_t done = 0;

    if (fd < 0) {
        return -1;
    }
    *len = (size_t)st.st_size;
    *bytes = malloc(*len ? *len : 1);
    if (!*bytes) {
        error("%s: out of memory for %zu bytes", path, *len);
        close(fd);
        return -1;
    }
    while (done < *len) {
        ssize_t n = read(fd, *bytes + done, *len - done);
        if (n <= 0) {
            error("cannot read %s: %s", path, n < 0 ? strerror(errno) : "short file");
            close(fd);
            return -1;
        }
        done += (size_t)n;
    }
    close(fd);
    return 0;
}

/* Walks the records; with ff->records set it also fills them in. */
static int walk_records(struct frames_file *ff, size_t len, const char *path)
{
    size_t pos = 16;
    unsigned n = 0;

    while (pos < len) {
        if (len - pos < 4 || len - pos - 4 < le32(ff->bytes + pos)) {
            error("%s: record %u at byte %zu is truncated", path, n, pos);
            return -1;
        }
        uint32_t size = le32(ff->bytes + pos);
        if (ff->records) {
            ff->records[n] = (struct record){ ff->bytes + pos + 4, size };
        }
        ff->largest = size > ff->largest ? size : ff->largest;
        pos += 4 + (size_t)size;
        n++;
    }
    ff->count = n;
    return 0;
}

static int load_frames_file(const char *path, struct frames_file *ff)
{
    size_t len;

    if (read_whole_file(path, &ff->bytes, &len)) {
        return -1;
    }
    if (len < 16 || memcmp(ff->bytes, "PYF1", 4) != 0) {
        error("%s: not a PYF1 frames file", path);
        return -1;
    }
    ff->fourcc = le32(ff->bytes + 4);
    ff->width = le32(ff->bytes + 8);
    ff->height = le32(ff->bytes + 12);
    if (walk_records(ff, len, path)) {
        return -1;
    }
    ff->records = calloc(ff->count ? ff->count : 1, sizeof(*ff->records));
    if (!ff->records || walk_records(ff, len, path)) {
        return -1;
    }
    if (ff->count == 0) {
        error("%s: no records", path);
        return -1;
    }
    return 0;
}

/* ---- finding the decoder ---- */

/*
 * Is fd a m2m node whose OUTPUT queue takes the stream's coded format?  Sets
 * the API to use.
 */
static bool is_decoder_for(int fd, void *ctx)
{
    struct decoder *d = ctx;
    struct v4l2_capability cap;
    uint32_t caps;

    if (query_caps(fd, &cap, &caps) < 0) {
        return false;
    }
    if (caps & V4L2_CAP_VIDEO_M2M_MPLANE) {
        d->mplane = true;
    } else if (caps & V4L2_CAP_VIDEO_M2M) {
        d->mplane = false;
    } else {
        return false;
    }
    if (!offers_format(fd, d->mplane ? V4L2_BUF_TYPE_VIDEO_OUTPUT_MPLANE
                                     : V4L2_BUF_TYPE_VIDEO_OUTPUT, d->in.fourcc, NULL, 0)) {
        return false;
    }
    /* The only driver known to skip LAST on a resolution change. */
    d->reschange_marks_last = strcmp((const char *)cap.driver, "virtio-video") != 0;
    note("driver %s, card %s, %s API", (const char *)cap.driver, (const char *)cap.card,
         d->mplane ? "multi-planar" : "single-planar");
    return true;
}

/* Opens --device, or the first /dev/videoN that decodes the stream's format. */
static int open_decoder(struct decoder *d)
{
    char fcc[5];

    if (d->opt.device) {
        d->fd = open_node(d->opt.device, is_decoder_for, d);
        if (d->fd < 0) {
            error("%s: %s", d->opt.device, errno == ENODEV
                  ? "not a V4L2 m2m decoder for this format" : strerror(errno));
            return -1;
        }
        return 0;
    }
    d->fd = find_node(is_decoder_for, d);
    if (d->fd < 0) {
        error("no /dev/videoN decodes %s", fourcc_str(d->in.fourcc, fcc));
        return -1;
    }
    return 0;
}

/* ---- formats, through either API ---- */

static void set_pixelformat(const struct decoder *d, struct v4l2_format *f, uint32_t fourcc)
{
    if (d->mplane) {
        f->fmt.pix_mp.pixelformat = fourcc;
    } else {
        f->fmt.pix.pixelformat = fourcc;
    }
}

/* S_FMT(OUTPUT): the coded format, its size hint and a buffer size for it. */
static int set_output_format(struct decoder *d)
{
    struct v4l2_format f = { .type = d->out.type };
    uint32_t size = d->in.largest > OUTPUT_MIN_SIZEIMAGE ? d->in.largest : OUTPUT_MIN_SIZEIMAGE;
    char want[5], got[5];

    if (d->mplane) {
        f.fmt.pix_mp = (struct v4l2_pix_format_mplane){
            .width = d->in.width, .height = d->in.height,
            .pixelformat = d->in.fourcc, .field = V4L2_FIELD_NONE, .num_planes = 1,
        };
        f.fmt.pix_mp.plane_fmt[0].sizeimage = size;
    } else {
        f.fmt.pix = (struct v4l2_pix_format){
            .width = d->in.width, .height = d->in.height,
            .pixelformat = d->in.fourcc, .field = V4L2_FIELD_NONE, .sizeimage = size,
        };
    }
    if (IOCTL(d->fd, VIDIOC_S_FMT, &f, "OUTPUT")) {
        return -1;
    }
    struct pic_format pf = pic_format_from(&f);
    if (pf.fourcc != d->in.fourcc || pf.num_planes != 1) {
        error("OUTPUT format %s (%u planes) instead of %s", fourcc_str(pf.fourcc, got),
              pf.num_planes, fourcc_str(d->in.fourcc, want));
        return -1;
    }
    note("OUTPUT %s %ux%u, buffers of %u bytes", fourcc_str(pf.fourcc, got),
         pf.width, pf.height, pf.sizeimage);
    return 0;
}

/* The decoder's visible rectangle: COMPOSE (the doc's), else CROP, else G_CROP. */
static bool query_visible_rect(const struct decoder *d, struct v4l2_rect *r)
{
    static const uint32_t targets[] = { V4L2_SEL_TGT_COMPOSE, V4L2_SEL_TGT_CROP };
    /* Selection and crop take the single-planar type names for both APIs. */
    struct v4l2_selection sel = { .type = V4L2_BUF_TYPE_VIDEO_CAPTURE };
    struct v4l2_crop crop = { .type = V4L2_BUF_TYPE_VIDEO_CAPTURE };

    for (unsigned i = 0; i < sizeof(targets) / sizeof(targets[0]); i++) {
        sel.target = targets[i];
        if (xioctl(d->fd, VIDIOC_G_SELECTION, &sel) == 0) {
            *r = sel.r;
            return true;
        }
    }
    if (xioctl(d->fd, VIDIOC_G_CROP, &crop) == 0) {
        *r = crop.c;
        return true;
    }
    return false;
}

/* The visible rectangle, or the whole frame if the decoder names none that fits. */
static void read_visible_rect(const struct decoder *d, struct pic_format *pf)
{
    struct v4l2_rect r = pf->visible;

    if (!query_visible_rect(d, &r)) {
        return;
    }
    bool fits = r.left >= 0 && r.top >= 0 && r.width > 0 && r.height > 0 &&
                (uint64_t)r.left + r.width <= pf->width &&
                (uint64_t)r.top + r.height <= pf->height;
    if (!fits) {
        note("visible rectangle %ux%u+%d+%d does not fit %ux%u: using the whole frame",
             r.width, r.height, r.left, r.top, pf->width, pf->height);
        return;
    }
    pf->visible = r;
}

/* G_FMT(CAPTURE) and the visible rectangle: what the decoder says now. */
static int read_capture_format(const struct decoder *d, struct pic_format *pf)
{
    struct v4l2_format f = { .type = d->cap.type };

    if (IOCTL(d->fd, VIDIOC_G_FMT, &f, "CAPTURE")) {
        return -1;
    }
    *pf = pic_format_from(&f);
    read_visible_rect(d, pf);
    return 0;
}

static int check_capture_format_offered(const struct decoder *d, uint32_t fourcc)
{
    char offered[256], s[5];

    if (offers_format(d->fd, d->cap.type, fourcc, offered, sizeof(offered))) {
        return 0;
    }
    error("the decoder offers no %s CAPTURE format for this stream (offers:%s)",
          fourcc_str(fourcc, s), offered);
    return -1;
}

/* S_FMT(CAPTURE) with the requested pixel format, keeping the decoder's size. */
static int set_capture_format(struct decoder *d)
{
    struct v4l2_format f = { .type = d->cap.type };
    uint32_t want = d->opt.capture_fourcc;
    char got_s[5], want_s[5];

    if (check_capture_format_offered(d, want) || IOCTL(d->fd, VIDIOC_G_FMT, &f, "CAPTURE")) {
        return -1;
    }
    set_pixelformat(d, &f, want);
    if (IOCTL(d->fd, VIDIOC_S_FMT, &f, "CAPTURE") || read_capture_format(d, &d->fmt)) {
        return -1;
    }
    if (d->fmt.fourcc != want || d->fmt.num_planes != 1) {
        error("CAPTURE format is %s with %u memory planes, wanted %s in one",
              fourcc_str(d->fmt.fourcc, got_s), d->fmt.num_planes, fourcc_str(want, want_s));
        return -1;
    }
    if (d->fmt.bytesperline < d->fmt.width) {
        error("CAPTURE bytesperline %u is less than the width %u",
              d->fmt.bytesperline, d->fmt.width);
        return -1;
    }
    return 0;
}

/* ---- initialization and capture setup ---- */

static int setup_output(struct decoder *d)
{
    if (set_output_format(d) || allocate_buffers(d->fd, &d->out, OUTPUT_BUFFERS)) {
        return -1;
    }
    for (unsigned i = 0; i < d->out.count; i++) {
        if (d->out.bufs[i].length < d->in.largest) {
            error("OUTPUT buffers hold %zu bytes, the largest record has %u",
                  d->out.bufs[i].length, d->in.largest);
            return -1;
        }
    }
    if (subscribe(d->fd, V4L2_EVENT_SOURCE_CHANGE, "SOURCE_CHANGE") ||
        subscribe(d->fd, V4L2_EVENT_EOS, "EOS")) {
        return -1;
    }
    return stream(d->fd, &d->out, true);
}

/* Prints RESCHANGE when pictures of a new visible size start. */
static void show_geometry(struct decoder *d, const struct pic_format *f)
{
    if (d->shown_width && (f->visible.width != d->shown_width ||
                           f->visible.height != d->shown_height)) {
        printf("RESCHANGE %ux%u\n", f->visible.width, f->visible.height);
    }
    d->shown_width = f->visible.width;
    d->shown_height = f->visible.height;
}

static int allocate_capture(struct decoder *d)
{
    unsigned min = MIN_BUFFERS(d->fd, V4L2_CID_MIN_BUFFERS_FOR_CAPTURE);
    unsigned count = min + CAPTURE_EXTRA < MAX_BUFFERS ? min + CAPTURE_EXTRA : MAX_BUFFERS;
    size_t extent = packed_extent(&d->fmt);

    if (layout_size(&d->fmt) != d->fmt.sizeimage) {
        /* The device's plane sizes are not V4L2's: the chroma may be elsewhere. */
        note("CAPTURE sizeimage %u is not the %zu bytes of V4L2's layout: "
             "pictures may be misread", d->fmt.sizeimage, layout_size(&d->fmt));
    }
    if (allocate_buffers(d->fd, &d->cap, count)) {
        return -1;
    }
    for (unsigned i = 0; i < d->cap.count; i++) {
        if (d->cap.bufs[i].length < extent) {
            error("CAPTURE buffer %u holds %zu bytes, the picture layout needs %zu",
                  i, d->cap.bufs[i].length, extent);
            return -1;
        }
    }
    note("CAPTURE %ux%u, bytesperline %u, sizeimage %u, visible %ux%u+%d+%d, "
         "%u buffers (minimum %u)", d->fmt.width, d->fmt.height, d->fmt.bytesperline,
         d->fmt.sizeimage, d->fmt.visible.width, d->fmt.visible.height,
         d->fmt.visible.left, d->fmt.visible.top, d->cap.count, min);
    return 0;
}

/* Capture setup: format, buffers, queue them all, stream. */
static int setup_capture(struct decoder *d)
{
    if (set_capture_format(d) || allocate_capture(d)) {
        return -1;
    }
    for (unsigned i = 0; i < d->cap.count; i++) {
        if (queue_buffer(d->fd, &d->cap, i, 0, 0)) {
            return -1;
        }
    }
    show_geometry(d, &d->fmt);
    return stream(d->fd, &d->cap, true);
}

/* After a resolution change: drop the CAPTURE buffers and set up anew. */
static int reconfigure_capture(struct decoder *d)
{
    d->reschange_pending = false;
    d->last_dequeued = false;
    d->have_next_fmt = false;
    if (stream(d->fd, &d->cap, false) || free_buffers(d->fd, &d->cap)) {
        return -1;
    }
    return setup_capture(d);
}

/* ---- pictures ---- */

/*
 * The format of a dequeued picture: normally the one its buffers were set up
 * for.  But with virtio-video a device may write a picture of the next size
 * into an old buffer as soon as the driver has re-read the params, which the
 * driver does before it queues the SOURCE_CHANGE: so such a picture can come
 * before the event, or between the event and our STREAMOFF.  The driver sets
 * bytesused from the params it holds at completion, which tells them apart
 * (unless both sizes take the same bytes).
 */
static int picture_format(struct decoder *d, uint32_t bytesused, size_t length,
                          const struct pic_format **f)
{
    *f = &d->fmt;
    if (d->reschange_marks_last || bytesused == d->fmt.sizeimage) {
        return 0;
    }
    if (!d->have_next_fmt) {
        if (read_capture_format(d, &d->next_fmt)) {
            return -1;
        }
        d->have_next_fmt = true;
    }
    if (d->next_fmt.fourcc == d->fmt.fourcc && d->next_fmt.sizeimage == bytesused &&
        packed_extent(&d->next_fmt) <= length) {
        /* Worth saying: the next ones may be lost when we drop the old buffers. */
        note("a %ux%u picture came in a buffer set up for %ux%u",
             d->next_fmt.visible.width, d->next_fmt.visible.height,
             d->fmt.visible.width, d->fmt.visible.height);
        *f = &d->next_fmt;
    }
    return 0;
}

/* Room for a packed picture of `size` bytes in d->packed. */
static int reserve_packed(struct decoder *d, size_t size)
{
    if (size <= d->packed_capacity) {
        return 0;
    }
    uint8_t *p = realloc(d->packed, size);
    if (!p) {
        error("out of memory for a %zu-byte picture", size);
        return -1;
    }
    d->packed = p;
    d->packed_capacity = size;
    return 0;
}

static int emit_picture(struct decoder *d, const struct v4l2_buffer *v)
{
    const struct buffer *b = &d->cap.bufs[v->index];
    const struct pic_format *f;
    uint64_t ts = buffer_timestamp_us(v);

    if (picture_format(d, buffer_bytesused(v), b->length, &f)) {
        return -1;
    }
    if (d->opt.unread) {            /* what a player handing buffers on costs */
        if (!d->opt.summary) {
            printf("FRAME %lu %" PRIu64 " -\n", d->pictures, ts);
        }
        d->pictures++;
        return 0;
    }
    size_t size = packed_size(f);
    if (reserve_packed(d, size)) {
        return -1;
    }
    pack_picture(f, b->mem, d->packed);
    show_geometry(d, f);
    uint32_t crc = crc32_update(0, d->packed, size);
    if (!d->opt.summary) {
        printf("FRAME %lu %" PRIu64 " %08" PRIx32 "\n", d->pictures, ts, crc);
    }
    d->pictures++;
    if (d->dump && (fwrite(d->packed, 1, size, d->dump) != size || fflush(d->dump))) {
        error("cannot write %s: %s", d->opt.dump_path, strerror(errno));
        return -1;
    }
    return 0;
}

/* A LAST buffer ends a drain, or the old pictures of a resolution change. */
static int on_last_buffer(struct decoder *d)
{
    if (d->reschange_pending) {
        return reconfigure_capture(d);
    }
    if (d->stop_sent || d->eos_event) {
        d->finished = true;
        return 0;
    }
    /* LAST came before we read its SOURCE_CHANGE: the event will follow. */
    d->last_dequeued = true;
    return 0;
}

static int handle_capture_buffer(struct decoder *d, const struct v4l2_buffer *v)
{
    if (v->flags & V4L2_BUF_FLAG_ERROR) {
        note("CAPTURE buffer %u came back with ERROR (timestamp %ld.%06ld)",
             v->index, (long)v->timestamp.tv_sec, (long)v->timestamp.tv_usec);
    } else if (buffer_bytesused(v) > 0 && emit_picture(d, v)) {
        return -1;
    }
    if (d->opt.max_frames && d->pictures >= (unsigned long)d->opt.max_frames) {
        d->finished = true;
        return 0;
    }
    if (v->flags & V4L2_BUF_FLAG_LAST) {
        return on_last_buffer(d);
    }
    return queue_buffer(d->fd, &d->cap, v->index, 0, 0);
}

static int dequeue_capture(struct decoder *d)
{
    struct v4l2_buffer v;
    struct v4l2_plane plane;
    int got;

    /* After LAST, DQBUF would only say EPIPE. */
    while (d->cap.streaming && !d->last_dequeued && !d->finished) {
        got = dequeue_buffer(d->fd, &d->cap, &v, &plane);
        if (got <= 0) {
            return got;
        }
        if (handle_capture_buffer(d, &v)) {
            return -1;
        }
    }
    return 0;
}

/* ---- events ---- */

/*
 * SOURCE_CHANGE.  The first one starts the capture setup.  Later ones are
 * resolution changes: the doc's decoder marks the last picture of the old
 * size LAST, and we reconfigure once it is out.  virtio-video never marks
 * LAST, but its device completes every old-size picture before it sends the
 * event, and the driver handles those completions before it queues the event
 * (it first re-reads the params, whose reply comes behind them on the same
 * virtqueue): so when we see the event, the old pictures are all done.  Take
 * them (and any new-size ones, see picture_format()), then reconfigure.
 */
static int on_source_change(struct decoder *d)
{
    if (!d->cap.streaming) {
        return setup_capture(d);
    }
    if (d->last_dequeued) {
        return reconfigure_capture(d);
    }
    if (d->reschange_marks_last) {
        d->reschange_pending = true;
        return 0;
    }
    if (dequeue_capture(d)) {
        return -1;
    }
    return d->finished ? 0 : reconfigure_capture(d);
}

static int handle_events(struct decoder *d)
{
    struct v4l2_event ev;
    int got;

    while ((got = dequeue_event(d->fd, &ev)) > 0) {
        if (ev.type == V4L2_EVENT_EOS) {
            d->eos_event = true;
        } else if (ev.type == V4L2_EVENT_SOURCE_CHANGE && on_source_change(d)) {
            return -1;
        }
        if (d->finished) {
            return 0;
        }
    }
    return got;
}

/* ---- feeding, seeking, draining ---- */

static int queue_record(struct decoder *d, unsigned index, unsigned rec)
{
    const struct record *r = &d->in.records[rec];

    memcpy(d->out.bufs[index].mem, r->data, r->size);
    return queue_buffer(d->fd, &d->out, index, r->size, (uint64_t)rec * RECORD_STEP_US);
}

static bool seek_due(const struct decoder *d)
{
    return d->opt.seek_at >= 0 && !d->seek_done &&
           d->next_record == (unsigned long)d->opt.seek_at;
}

/* Seek: STREAMOFF(OUTPUT) drops what is queued, STREAMON, go on from M. */
static int seek(struct decoder *d)
{
    if (stream(d->fd, &d->out, false) || stream(d->fd, &d->out, true)) {
        return -1;
    }
    d->seek_done = true;
    d->next_record = (unsigned)d->opt.seek_to;
    printf("SEEK %ld %ld\n", d->opt.seek_at, d->opt.seek_to);
    return 0;
}

static int feed_output(struct decoder *d)
{
    for (;;) {
        if (seek_due(d)) {
            if (seek(d)) {
                return -1;
            }
            continue;
        }
        int index = free_buffer(&d->out);
        if (d->next_record >= d->in.count || index < 0) {
            return 0;
        }
        /* bytesused 0 would make vb2 take the whole buffer: skip empty records. */
        if (d->in.records[d->next_record].size > 0 &&
            queue_record(d, (unsigned)index, d->next_record)) {
            return -1;
        }
        d->next_record++;
    }
}

/*
 * The drain starts once every record is queued and CAPTURE streams (the
 * driver ignores DEC_CMD_STOP otherwise), and by default only once every
 * OUTPUT buffer is back: see the header about the driver's race.
 */
static int maybe_stop(struct decoder *d)
{
    struct v4l2_decoder_cmd cmd = { .cmd = V4L2_DEC_CMD_STOP };

    if (d->stop_sent || d->next_record < d->in.count || !d->cap.streaming ||
        d->reschange_pending || d->last_dequeued) {
        return 0;
    }
    if (!d->opt.stop_early && d->out.queued > 0) {
        return 0;
    }
    if (IOCTL(d->fd, VIDIOC_DECODER_CMD, &cmd, "V4L2_DEC_CMD_STOP")) {
        return -1;
    }
    note("drain started with %u OUTPUT buffers still queued", d->out.queued);
    d->stop_sent = true;
    return 0;
}

/* ---- the loop ---- */

static const char *waiting_for(const struct decoder *d)
{
    if (!d->cap.streaming) {
        return "the first V4L2_EVENT_SOURCE_CHANGE (is the stream decodable?)";
    }
    if (d->reschange_pending) {
        return "the LAST CAPTURE buffer of a resolution change";
    }
    if (d->last_dequeued) {
        return "the V4L2_EVENT_SOURCE_CHANGE that goes with a LAST CAPTURE buffer";
    }
    if (d->stop_sent) {
        return "the LAST CAPTURE buffer after V4L2_DEC_CMD_STOP";
    }
    if (d->next_record >= d->in.count) {
        return "the OUTPUT buffers to come back before V4L2_DEC_CMD_STOP";
    }
    return "decoded pictures or free OUTPUT buffers";
}

static int wait_and_handle(struct decoder *d)
{
    short revents = 0;
    int got = poll_node(d->fd, poll_events(&d->out, &d->cap, d->last_dequeued), &revents);

    if (got == POLL_IDLE) {
        error("nothing happened for %d s while waiting for %s (%u of %u records queued, "
              "%u OUTPUT buffers with the driver)", IDLE_TIMEOUT_MS / 1000, waiting_for(d),
              d->next_record, d->in.count, d->out.queued);
        return -1;
    }
    if (got <= 0) {
        return got;
    }
    if (((revents & POLLPRI) && handle_events(d)) ||
        ((revents & POLLOUT) && dequeue_output(d->fd, &d->out, NULL)) ||
        ((revents & POLLIN) && dequeue_capture(d))) {
        return -1;
    }
    return 0;
}

static int decode(struct decoder *d)
{
    d->out = (struct queue){ .name = "OUTPUT" };
    d->cap = (struct queue){ .name = "CAPTURE" };
    if (load_frames_file(d->opt.frames_path, &d->in)) {
        return -1;
    }
    if (d->opt.seek_at > (long)d->in.count || d->opt.seek_to >= (long)d->in.count) {
        error("--seek %ld:%ld is outside the %u records", d->opt.seek_at, d->opt.seek_to,
              d->in.count);
        return -1;
    }
    if (open_decoder(d)) {
        return -1;
    }
    d->out.type = d->mplane ? V4L2_BUF_TYPE_VIDEO_OUTPUT_MPLANE : V4L2_BUF_TYPE_VIDEO_OUTPUT;
    d->cap.type = d->mplane ? V4L2_BUF_TYPE_VIDEO_CAPTURE_MPLANE : V4L2_BUF_TYPE_VIDEO_CAPTURE;
    if (setup_output(d)) {
        return -1;
    }
    while (!d->finished) {
        if (feed_output(d) || maybe_stop(d) || wait_and_handle(d)) {
            return -1;
        }
    }
    return 0;
}

/* ---- self-test of the packing and the CRC (runs anywhere) ---- */

/*
 * A 7x5 picture at (2,2) in a 16x9 frame with bytesperline 16, padding 0xee.
 * The plane offsets below are worked out by hand from V4L2's layout, apart
 * from visible_planes(); the CRCs are Python's zlib.crc32 of the same pixels
 * packed (tests: see guest/README.md).
 */
static bool selftest_one(uint32_t fourcc, uint32_t expected)
{
    static const size_t nv12[][3] = { { 34, 16, 7 }, { 162, 16, 8 } };
    static const size_t yu12[][3] = { { 34, 16, 7 }, { 153, 8, 4 }, { 193, 8, 4 } };
    const size_t (*planes)[3] = fourcc == V4L2_PIX_FMT_NV12 ? nv12 : yu12;
    unsigned nplanes = fourcc == V4L2_PIX_FMT_NV12 ? 2 : 3;
    struct pic_format f = { fourcc, 16, 9, 16, 224, 1, { 2, 2, 7, 5 } };
    uint8_t buf[224], out[224];

    memset(buf, 0xee, sizeof(buf));
    for (unsigned p = 0; p < nplanes; p++) {
        for (size_t r = 0; r < (p ? 3 : 5); r++) {
            for (size_t c = 0; c < planes[p][2]; c++) {
                buf[planes[p][0] + r * planes[p][1] + c] = pattern(p, r, c);
            }
        }
    }
    pack_picture(&f, buf, out);
    uint32_t crc = crc32_update(0, out, packed_size(&f));
    bool ok = crc == expected && packed_extent(&f) <= sizeof(buf);
    char s[5];
    printf("selftest %s: crc %08" PRIx32 " (want %08" PRIx32 "), %zu bytes: %s\n",
           fourcc_str(fourcc, s), crc, expected, packed_size(&f), ok ? "ok" : "FAILED");
    return ok;
}

static int selftest(void)
{
    uint32_t check = crc32_update(0, (const uint8_t *)"123456789", 9);
    bool ok = check == 0xcbf43926u;

    printf("selftest crc32(\"123456789\") = %08" PRIx32 ": %s\n", check, ok ? "ok" : "FAILED");
    ok &= selftest_one(V4L2_PIX_FMT_NV12, 0x38a26f1au);
    ok &= selftest_one(V4L2_PIX_FMT_YUV420, 0x59ecfdbbu);
    return ok ? 0 : 1;
}

/* ---- command line ---- */

static void usage(FILE *to)
{
    fprintf(to,
            "usage: " PROG " [options] FRAMES_FILE\n"
            "       " PROG " --selftest\n"
            "  --device PATH     decoder node (default: the first /dev/videoN that decodes\n"
            "                    the file's coded format)\n"
            "  --format NV12|YU12  CAPTURE pixel format (default NV12)\n"
            "  --stop-early      DEC_CMD_STOP right after the last QBUF, without waiting\n"
            "                    for the OUTPUT buffers (shows the driver's drain race)\n"
            "  --seek N:M        after N records are queued, seek and go on from record M\n"
            "  --max-frames K    stop after K pictures, without draining\n"
            "  --dump FILE       also write every packed picture to FILE\n"
            "  --unread          do not read the pictures (no CRC): for timing\n"
            "  --summary         no FRAME lines, only the DONE line\n"
            "  --selftest        check the CRC and the picture packing, then exit\n");
}

static int parse_seek(const char *s, struct options *o)
{
    char *colon = strchr(s, ':');

    if (!colon) {
        return -1;
    }
    *colon = '\0';
    return (parse_number(s, &o->seek_at) || parse_number(colon + 1, &o->seek_to) ||
            o->seek_at < 1) ? -1 : 0;
}

/* Returns 0 to run, 1 for --selftest, -1 on a usage error. */
static int parse_options(int argc, char **argv, struct options *o)
{
    static const struct option longs[] = {
        { "device", required_argument, NULL, 'd' },
        { "format", required_argument, NULL, 'f' },
        { "stop-early", no_argument, NULL, 'e' },
        { "seek", required_argument, NULL, 's' },
        { "max-frames", required_argument, NULL, 'k' },
        { "dump", required_argument, NULL, 'o' },
        { "unread", no_argument, NULL, 'u' },
        { "summary", no_argument, NULL, 'q' },
        { "selftest", no_argument, NULL, 't' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    int c, bad = 0;

    *o = (struct options){ .capture_fourcc = V4L2_PIX_FMT_NV12, .seek_at = -1,
                           .seek_to = -1 };
    while ((c = getopt_long(argc, argv, "", longs, NULL)) != -1) {
        switch (c) {
        case 'd': o->device = optarg; break;
        case 'f': bad |= parse_format(optarg, &o->capture_fourcc); break;
        case 'e': o->stop_early = true; break;
        case 's': bad |= parse_seek(optarg, o); break;
        case 'k': bad |= parse_number(optarg, &o->max_frames) || o->max_frames < 1; break;
        case 'o': o->dump_path = optarg; break;
        case 'u': o->unread = true; break;
        case 'q': o->summary = true; break;
        case 't': return 1;
        case 'h': usage(stdout); exit(0);
        default: bad = 1; break;
        }
    }
    if (bad || optind != argc - 1) {
        return -1;
    }
    o->frames_path = argv[optind];
    return 0;
}

int main(int argc, char **argv)
{
    static struct decoder d = { .fd = -1 };
    struct timespec start, end;
    int mode, rc;

    /* Line by line: the host reads the console as we go, and may kill us. */
    setvbuf(stdout, NULL, _IOLBF, 0);
    crc32_init();
    mode = parse_options(argc, argv, &d.opt);
    if (mode < 0) {
        usage(stderr);
        return 2;
    }
    if (mode == 1) {
        return selftest();
    }
    if (d.opt.dump_path && !(d.dump = fopen(d.opt.dump_path, "wb"))) {
        error("cannot create %s: %s", d.opt.dump_path, strerror(errno));
        return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &start);
    rc = decode(&d) ? 1 : 0;
    clock_gettime(CLOCK_MONOTONIC, &end);
    printf("DONE pictures=%lu rc=%d seconds=%.3f\n", d.pictures, rc,
           seconds_between(&start, &end));
    /* Closing the node stops both queues and frees every buffer. */
    if (d.fd >= 0) {
        close(d.fd);
    }
    if (d.dump) {
        fclose(d.dump);
    }
    return rc;
}
