/*
 * pyemb-v4l2-encode: a small V4L2 stateful-encoder client for the test guest
 *
 * It feeds raw pictures from a file, one per OUTPUT buffer, to a V4L2
 * memory-to-memory encoder node, writes what comes back on the CAPTURE queue
 * to a file of records and prints one line per coded buffer, so that the host
 * can check the stream (decode it with PyAV, look at the key frames, the
 * sizes).  It follows the kernel's stateful encoder interface
 * (Documentation/userspace-api/media/v4l/dev-encoder.rst):
 *
 *   Initialization  S_FMT(CAPTURE, coded format), ENUM_FMT(OUTPUT),
 *                   S_FMT(OUTPUT, raw format), G_FMT both, S_PARM(OUTPUT),
 *                   the controls, SUBSCRIBE_EVENT(EOS),
 *                   V4L2_CID_MIN_BUFFERS_FOR_OUTPUT, REQBUFS both, QBUF every
 *                   CAPTURE buffer, STREAMON both.
 *   Encoding        one poll() loop: fill and queue OUTPUT buffers as they
 *                   come back (with the per-picture controls set just
 *                   before), write and requeue CAPTURE buffers.
 *   Drain           once every picture is queued and every OUTPUT buffer is
 *                   back, V4L2_ENC_CMD_STOP, then dequeue CAPTURE up to the
 *                   buffer with V4L2_BUF_FLAG_LAST; STREAMOFF both.
 *
 * Facts about the ChromeOS virtio-video guest driver (driver name
 * "virtio-video", node "stateful-encoder") that shape this program:
 *   - it offers only the multi-planar API (V4L2_CAP_VIDEO_M2M_MPLANE); NV12
 *     and YU12 come as one memory plane: the device's component planes one
 *     after another, sizeimage being the sum of their sizes, bytesperline
 *     the luma stride (see luma_rows() for where the chroma goes);
 *   - S_FMT hands our num_planes and plane_fmt[] to the device as its plane
 *     parameters and ignores a refusal, answering with what it holds: so
 *     every format is checked after S_FMT;
 *   - the OUTPUT formats it lists depend on the CAPTURE (coded) format: it
 *     must be set first;
 *   - S_PARM(OUTPUT) fails unless the device lists the rate for the format;
 *   - H264_PROFILE and H264_LEVEL are refused for other codecs, and
 *     V4L2_CID_MPEG_VIDEO_BITRATE exists only if the device reported a
 *     bitrate when the node was opened;
 *   - V4L2_ENC_CMD_STOP is ignored unless both queues stream, and it waits
 *     (uninterruptibly) until its m2m source queue is empty before it sends
 *     the drain; we send it only once every OUTPUT buffer is back anyway;
 *   - the drain ends with an empty (bytesused 0) CAPTURE buffer marked LAST,
 *     plus a V4L2_EVENT_EOS;
 *   - the OUTPUT queue starts (vb2's start_streaming) only once
 *     V4L2_CID_MIN_BUFFERS_FOR_OUTPUT buffers are queued: fewer pictures than
 *     that are never encoded.
 *
 * Input file: packed raw pictures of --format and --size, no padding: NV12
 * is the Y rows then the interleaved CbCr rows ((W+1)/2*2 bytes each,
 * (H+1)/2 rows); YU12 is Y, then Cb, then Cr, each chroma plane
 * (W+1)/2 x (H+1)/2.  Picture i is queued with timestamp i * 33333 us, so a
 * coded buffer's timestamp names the picture it came from.  With --frames
 * beyond the file's pictures, the file is read again from the start.
 *
 * Output file: "PYF1", le32 coded fourcc, le32 width, le32 height (--size),
 * then for each non-empty CAPTURE buffer a le32 length + its bytes: the
 * container pyemb-v4l2-decode reads.
 *
 * Output on stdout, one line each, flushed at once (the host may kill us):
 *   PACKET <index> <timestamp_us> <size> <K|P|B|->
 *       per non-empty CAPTURE buffer, index counting them from 0; K, P, B
 *       for V4L2_BUF_FLAG_KEYFRAME, PFRAME, BFRAME, - for none
 *   DONE packets=<n> rc=<0|1> seconds=<from opening the node to the end>
 * Everything else (progress, warnings, errors) goes to stderr.
 *
 * Build: gcc -static -O2 -Wall -Wextra -Werror -o pyemb-v4l2-encode v4l2_encode.c
 * (with v4l2_common.h beside it: what it shares with pyemb-v4l2-decode)
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include <getopt.h>
#include <inttypes.h>

#define PROG "pyemb-v4l2-encode"
#include "v4l2_common.h"

#ifndef V4L2_CTRL_CLASS_CODEC              /* headers before Linux 5.11 */
#define V4L2_CTRL_CLASS_CODEC V4L2_CTRL_CLASS_MPEG
#endif

#define OUTPUT_BUFFERS 4            /* raw pictures in flight, at least */
#define CAPTURE_BUFFERS 4           /* coded buffers in flight */
#define CAPTURE_MIN_SIZEIMAGE (64u << 10)
#define MAX_CHANGES 256             /* --force-key and --bitrate-change entries */
#define PICTURE_STEP_US 33333       /* timestamp of picture i: i * PICTURE_STEP_US */
#define DEFAULT_FPS 30

/* A control to set just before queueing picture `at`. */
struct change {
    unsigned long at;
    long value;
};

struct options {
    const char *device;
    const char *raw_path;
    const char *out_path;
    uint32_t codec, raw_fourcc;
    uint32_t width, height;
    long fps;
    bool fps_given;                 /* an explicit --fps must be accepted */
    long bitrate, peak, mode;       /* -1: leave the driver's */
    long profile, level;            /* -1: leave the driver's */
    bool prepend_sps;
    struct change force_key[MAX_CHANGES];
    unsigned force_keys;
    struct change bitrate_change[MAX_CHANGES];
    unsigned bitrate_changes;
    long frames;                    /* 0: every picture of the file once */
    bool summary;                   /* --summary: no PACKET lines */
};

struct encoder {
    struct options opt;
    const uint8_t *raw;             /* the input file, mapped */
    size_t raw_size;
    size_t picture_size;            /* one packed picture */
    unsigned long file_pictures;
    unsigned long total;            /* pictures to encode */
    int fd;
    struct queue out, cap;
    struct pic_format fmt;          /* OUTPUT (raw) format */
    struct plane_span src[MAX_PLANES], dst[MAX_PLANES];
    unsigned planes;
    FILE *out_file;
    unsigned long next_picture;
    bool stop_sent, eos_event, last_dequeued, finished;
    unsigned long packets;
    unsigned long errors;           /* buffers that came back with ERROR */
    struct timespec start;          /* when we opened the node */
};

/* ---- picture layout ---- */

/*
 * The rows of the luma plane in an OUTPUT buffer, which says where the
 * chroma starts (luma_rows * bytesperline) and, for YU12, where Cr starts
 * (one chroma plane of (luma_rows + 1) / 2 rows further).
 *
 * The driver folds the device's component planes into one memory plane, one
 * after another, and tells only the luma stride (bytesperline) and the sum of
 * the plane sizes (sizeimage), not the luma plane's size.  A device may make
 * the planes taller than the picture (a coded height aligned to 16, say), so
 * bytesperline * height is not always where the chroma is.  The rule:
 *
 *   the luma plane has Ha rows, Ha being the number of rows, at least the
 *   format's height, for which V4L2's 4:2:0 layout at stride bytesperline
 *   (layout_bytes()) is exactly sizeimage bytes; if there is none, height.
 *
 * For an even stride and an even Ha that is "the luma plane is 2/3 of
 * sizeimage".  V4L2's own layout (odd heights included) gives Ha = height;
 * a sizeimage with padding at the end matches no Ha and falls back to
 * height.  What the rule cannot tell apart is tail padding that happens to
 * be exactly what some taller planes would take: it takes that for taller
 * planes, which is what devices that align the coded height (crosvm's,
 * pyemb's) do.
 */
static size_t luma_rows(const struct pic_format *f)
{
    uint64_t bpl = f->bytesperline;

    if (bpl == 0) {
        return f->height;
    }
    /* layout_bytes() grows with the rows, by about 1.5 * bpl a row. */
    uint64_t guess = 2 * (uint64_t)f->sizeimage / (3 * bpl);
    for (uint64_t rows = guess > 2 ? guess - 2 : 0; rows <= guess + 2; rows++) {
        if (rows >= f->height && layout_bytes(f->fourcc, bpl, rows) == f->sizeimage) {
            return (size_t)rows;
        }
    }
    return f->height;
}

/* Where the chroma starts: the size of the luma plane. */
static size_t luma_plane_size(const struct pic_format *f)
{
    return (size_t)f->bytesperline * luma_rows(f);
}

/*
 * The planes of a w x h picture in a buffer of format f: Y at 0 with the
 * stride bytesperline; NV12's CbCr at luma_plane_size() with the same
 * stride; YU12's Cb there and Cr one chroma plane further, with half the
 * stride (rounded up, as V4L2 does) and half the luma plane's rows.
 */
static unsigned buffer_planes(const struct pic_format *f, uint32_t w, uint32_t h,
                              struct plane_span p[MAX_PLANES])
{
    return frame_planes(f->fourcc, f->bytesperline, luma_rows(f), 0, 0, w, h, p);
}

/* Black (Y 16, Cb Cr 128) everywhere: what padding and unused rows hold. */
static void fill_black(const struct pic_format *f, uint8_t *mem, size_t length)
{
    size_t luma = luma_plane_size(f);

    luma = luma < length ? luma : length;
    memset(mem, 16, luma);
    memset(mem + luma, 128, length - luma);
}

/* ---- the input file ---- */

/* Maps RAW_FILE and counts its pictures. */
static int map_raw_file(struct encoder *e)
{
    struct plane_span p[MAX_PLANES];
    unsigned n = packed_planes(e->opt.raw_fourcc, e->opt.width, e->opt.height, p);
    struct stat st;
    int fd = open_input(e->opt.raw_path, &st);

    e->planes = n;
    memcpy(e->src, p, sizeof(p));
    e->picture_size = planes_extent(p, n);
    if (fd < 0) {
        return -1;
    }
    e->raw_size = (size_t)st.st_size;
    if (e->raw_size < e->picture_size || e->raw_size % e->picture_size != 0) {
        error("%s: %zu bytes are not whole %ux%u pictures of %zu bytes", e->opt.raw_path,
              e->raw_size, e->opt.width, e->opt.height, e->picture_size);
        close(fd);
        return -1;
    }
    void *mem = mmap(NULL, e->raw_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (mem == MAP_FAILED) {
        error("cannot map %s: %s", e->opt.raw_path, strerror(errno));
        return -1;
    }
    e->raw = mem;
    e->file_pictures = e->raw_size / e->picture_size;
    e->total = e->opt.frames ? (unsigned long)e->opt.frames : e->file_pictures;
    return 0;
}

/* ---- finding the encoder ---- */

/* What is_encoder_for() looks for, and whether it says why a node is not it. */
struct probe {
    uint32_t codec;
    bool loud;
    bool opened;                    /* set by is_encoder_for(): the node did open */
};

/* Is fd a multi-planar m2m node whose CAPTURE queue makes the codec? */
static bool is_encoder_for(int fd, void *ctx)
{
    struct probe *p = ctx;
    struct v4l2_capability cap;
    uint32_t caps;

    p->opened = true;
    if (query_caps(fd, &cap, &caps) < 0) {
        if (p->loud) {
            error("VIDIOC_QUERYCAP failed: %s (errno %d)", strerror(errno), errno);
        }
        return false;
    }
    if (!(caps & V4L2_CAP_VIDEO_M2M_MPLANE)) {
        if (p->loud) {
            error("%s (%s) has no V4L2_CAP_VIDEO_M2M_MPLANE (capabilities 0x%08x)",
                  (const char *)cap.card, (const char *)cap.driver, caps);
        }
        return false;
    }
    if (!offers_format(fd, V4L2_BUF_TYPE_VIDEO_CAPTURE_MPLANE, p->codec, NULL, 0)) {
        if (p->loud) {
            char s[5];
            error("%s (%s) lists no %s CAPTURE format: not an encoder for it",
                  (const char *)cap.card, (const char *)cap.driver, fourcc_str(p->codec, s));
        }
        return false;
    }
    note("driver %s, card %s", (const char *)cap.driver, (const char *)cap.card);
    return true;
}

/* Opens --device, or the first /dev/videoN that encodes to --codec. */
static int open_encoder(struct encoder *e)
{
    char fcc[5];

    if (e->opt.device) {
        struct probe loud = { .codec = e->opt.codec, .loud = true };
        e->fd = open_node(e->opt.device, is_encoder_for, &loud);
        if (e->fd < 0 && !loud.opened) {
            error("cannot open %s: %s", e->opt.device, strerror(errno));
        }
        return e->fd < 0 ? -1 : 0;
    }
    struct probe quiet = { .codec = e->opt.codec };
    e->fd = find_node(is_encoder_for, &quiet);
    if (e->fd < 0) {
        error("no /dev/videoN encodes to %s", fourcc_str(e->opt.codec, fcc));
        return -1;
    }
    return 0;
}

/* ---- formats and parameters ---- */

/* S_FMT(CAPTURE): the coded format, the size, room for a coded picture. */
static int set_capture_format(struct encoder *e)
{
    struct v4l2_format f = { .type = V4L2_BUF_TYPE_VIDEO_CAPTURE_MPLANE };
    uint64_t size = (uint64_t)e->opt.width * e->opt.height * 3 / 2;
    char want[5], got[5];

    f.fmt.pix_mp = (struct v4l2_pix_format_mplane){
        .width = e->opt.width, .height = e->opt.height,
        .pixelformat = e->opt.codec, .field = V4L2_FIELD_NONE, .num_planes = 1,
    };
    f.fmt.pix_mp.plane_fmt[0].sizeimage =
        size > CAPTURE_MIN_SIZEIMAGE ? (uint32_t)size : CAPTURE_MIN_SIZEIMAGE;
    if (IOCTL(e->fd, VIDIOC_S_FMT, &f, "CAPTURE")) {
        return -1;
    }
    struct pic_format pf = pic_format_from(&f);
    if (pf.fourcc != e->opt.codec || pf.num_planes != 1 || pf.sizeimage == 0) {
        error("CAPTURE format %s (%u planes, sizeimage %u) instead of %s",
              fourcc_str(pf.fourcc, got), pf.num_planes, pf.sizeimage,
              fourcc_str(e->opt.codec, want));
        return -1;
    }
    return 0;
}

/* The OUTPUT formats depend on the coded format: check ours is one. */
static int check_output_format_offered(const struct encoder *e)
{
    char offered[256], s[5], c[5];

    if (offers_format(e->fd, V4L2_BUF_TYPE_VIDEO_OUTPUT_MPLANE, e->opt.raw_fourcc, offered,
                      sizeof(offered))) {
        return 0;
    }
    error("the encoder takes no %s OUTPUT pictures for %s (offers:%s)",
          fourcc_str(e->opt.raw_fourcc, s), fourcc_str(e->opt.codec, c), offered);
    return -1;
}

/* S_FMT(OUTPUT): the raw format and size in V4L2's layout (a request). */
static int set_output_format(struct encoder *e)
{
    struct v4l2_format f = { .type = V4L2_BUF_TYPE_VIDEO_OUTPUT_MPLANE };

    f.fmt.pix_mp = (struct v4l2_pix_format_mplane){
        .width = e->opt.width, .height = e->opt.height,
        .pixelformat = e->opt.raw_fourcc, .field = V4L2_FIELD_NONE, .num_planes = 1,
    };
    f.fmt.pix_mp.plane_fmt[0].bytesperline = e->opt.width;
    f.fmt.pix_mp.plane_fmt[0].sizeimage = (uint32_t)e->picture_size;
    return IOCTL(e->fd, VIDIOC_S_FMT, &f, "OUTPUT");
}

/* G_FMT both, and check the OUTPUT layout holds our pictures. */
static int read_formats(struct encoder *e)
{
    struct v4l2_format out = { .type = V4L2_BUF_TYPE_VIDEO_OUTPUT_MPLANE };
    struct v4l2_format cap = { .type = V4L2_BUF_TYPE_VIDEO_CAPTURE_MPLANE };
    char s[5], want[5];

    if (IOCTL(e->fd, VIDIOC_G_FMT, &out, "OUTPUT") ||
        IOCTL(e->fd, VIDIOC_G_FMT, &cap, "CAPTURE")) {
        return -1;
    }
    struct pic_format c = pic_format_from(&cap);
    e->fmt = pic_format_from(&out);
    note("CAPTURE %s %ux%u, buffers of %u bytes", fourcc_str(c.fourcc, s), c.width, c.height,
         c.sizeimage);
    note("OUTPUT %s %ux%u, bytesperline %u, sizeimage %u, chroma at byte %zu",
         fourcc_str(e->fmt.fourcc, s), e->fmt.width, e->fmt.height, e->fmt.bytesperline,
         e->fmt.sizeimage, luma_plane_size(&e->fmt));
    if (c.fourcc != e->opt.codec) {
        error("CAPTURE format went from %s to %s", fourcc_str(e->opt.codec, want),
              fourcc_str(c.fourcc, s));
        return -1;
    }
    if (e->fmt.fourcc != e->opt.raw_fourcc || e->fmt.num_planes != 1) {
        error("OUTPUT format is %s with %u memory planes, wanted %s in one",
              fourcc_str(e->fmt.fourcc, s), e->fmt.num_planes,
              fourcc_str(e->opt.raw_fourcc, want));
        return -1;
    }
    if (e->fmt.width < e->opt.width || e->fmt.height < e->opt.height) {
        error("OUTPUT is %ux%u: too small for %ux%u pictures",
              e->fmt.width, e->fmt.height, e->opt.width, e->opt.height);
        return -1;
    }
    if (e->fmt.width != e->opt.width || e->fmt.height != e->opt.height) {
        note("the pictures fill the top left of the %ux%u frame; the rest is black",
             e->fmt.width, e->fmt.height);
    }
    e->planes = buffer_planes(&e->fmt, e->opt.width, e->opt.height, e->dst);
    for (unsigned i = 0; i < e->planes; i++) {
        if (e->dst[i].stride < e->dst[i].row_bytes) {
            error("OUTPUT bytesperline %u is too small for rows of %zu bytes in plane %u",
                  e->fmt.bytesperline, e->dst[i].row_bytes, i);
            return -1;
        }
    }
    size_t extent = planes_extent(e->dst, e->planes);
    if (extent > e->fmt.sizeimage) {
        error("a %ux%u picture laid out at bytesperline %u needs %zu bytes, sizeimage is %u",
              e->opt.width, e->opt.height, e->fmt.bytesperline, extent, e->fmt.sizeimage);
        return -1;
    }
    return 0;
}

/* S_PARM(OUTPUT): the frame rate; an explicit --fps must be accepted. */
static int set_frame_rate(struct encoder *e)
{
    struct v4l2_streamparm parm = { .type = V4L2_BUF_TYPE_VIDEO_OUTPUT_MPLANE };
    struct v4l2_fract *tpf = &parm.parm.output.timeperframe;

    *tpf = (struct v4l2_fract){ 1, (uint32_t)e->opt.fps };
    if (xioctl(e->fd, VIDIOC_S_PARM, &parm) < 0) {
        if (e->opt.fps_given) {
            error("VIDIOC_S_PARM (OUTPUT, 1/%ld s) failed: %s (errno %d)", e->opt.fps,
                  strerror(errno), errno);
            return -1;
        }
        warning("VIDIOC_S_PARM (OUTPUT, 1/%ld s) failed: %s (errno %d); going on",
                e->opt.fps, strerror(errno), errno);
        return 0;
    }
    note("frame interval %u/%u s", tpf->numerator, tpf->denominator);
    return 0;
}

/* One codec control through S_EXT_CTRLS; a refused optional one is a warning. */
static int set_control(struct encoder *e, uint32_t id, const char *name, long value,
                       bool required)
{
    struct v4l2_ext_control c = { .id = id, .value = (int32_t)value };
    struct v4l2_ext_controls ctrls = { .ctrl_class = V4L2_CTRL_CLASS_CODEC, .count = 1,
                                       .controls = &c };

    if (xioctl(e->fd, VIDIOC_S_EXT_CTRLS, &ctrls) == 0) {
        return 0;
    }
    if (required) {
        error("VIDIOC_S_EXT_CTRLS (%s = %ld) failed: %s (errno %d)", name, value,
              strerror(errno), errno);
        return -1;
    }
    warning("VIDIOC_S_EXT_CTRLS (%s = %ld) failed: %s (errno %d); going on", name, value,
            strerror(errno), errno);
    return 0;
}

#define CONTROL(e, id, value, required) set_control(e, id, #id, value, required)

static int set_controls(struct encoder *e)
{
    const struct options *o = &e->opt;

    if ((o->mode >= 0 && CONTROL(e, V4L2_CID_MPEG_VIDEO_BITRATE_MODE, o->mode, false)) ||
        (o->bitrate >= 0 && CONTROL(e, V4L2_CID_MPEG_VIDEO_BITRATE, o->bitrate, true)) ||
        (o->peak >= 0 && CONTROL(e, V4L2_CID_MPEG_VIDEO_BITRATE_PEAK, o->peak, false)) ||
        (o->profile >= 0 && CONTROL(e, V4L2_CID_MPEG_VIDEO_H264_PROFILE, o->profile, false)) ||
        (o->level >= 0 && CONTROL(e, V4L2_CID_MPEG_VIDEO_H264_LEVEL, o->level, false)) ||
        (o->prepend_sps &&
         CONTROL(e, V4L2_CID_MPEG_VIDEO_PREPEND_SPSPPS_TO_IDR, 1, false))) {
        return -1;
    }
    return 0;
}

/* Whether a control is due before picture i. */
static bool controls_due(const struct encoder *e, unsigned long i)
{
    for (unsigned k = 0; k < e->opt.force_keys; k++) {
        if (e->opt.force_key[k].at == i) {
            return true;
        }
    }
    for (unsigned k = 0; k < e->opt.bitrate_changes; k++) {
        if (e->opt.bitrate_change[k].at == i) {
            return true;
        }
    }
    return false;
}

/* The controls due before picture i: key frames (a button) and bitrates. */
static int picture_controls(struct encoder *e, unsigned long i)
{
    for (unsigned k = 0; k < e->opt.force_keys; k++) {
        if (e->opt.force_key[k].at == i &&
            CONTROL(e, V4L2_CID_MPEG_VIDEO_FORCE_KEY_FRAME, 1, false)) {
            return -1;
        }
    }
    for (unsigned k = 0; k < e->opt.bitrate_changes; k++) {
        if (e->opt.bitrate_change[k].at == i &&
            CONTROL(e, V4L2_CID_MPEG_VIDEO_BITRATE, e->opt.bitrate_change[k].value, true)) {
            return -1;
        }
    }
    return 0;
}

/* ---- initialization ---- */

static int allocate_output(struct encoder *e)
{
    unsigned min = MIN_BUFFERS(e->fd, V4L2_CID_MIN_BUFFERS_FOR_OUTPUT);
    unsigned count = min > OUTPUT_BUFFERS ? min : OUTPUT_BUFFERS;
    size_t extent = planes_extent(e->dst, e->planes);

    if (allocate_buffers(e->fd, &e->out, count < MAX_BUFFERS ? count : MAX_BUFFERS)) {
        return -1;
    }
    for (unsigned i = 0; i < e->out.count; i++) {
        struct buffer *b = &e->out.bufs[i];
        if (b->length < extent || b->length < e->fmt.sizeimage) {
            error("OUTPUT buffer %u holds %zu bytes; sizeimage is %u, a picture needs %zu",
                  i, b->length, e->fmt.sizeimage, extent);
            return -1;
        }
        fill_black(&e->fmt, b->mem, b->length);
    }
    if (e->total < min) {
        warning("%lu pictures, but the OUTPUT queue starts only once %u are queued",
                e->total, min);
    }
    note("OUTPUT %u buffers of %zu bytes (minimum %u)", e->out.count, e->out.bufs[0].length,
         min);
    return 0;
}

static int allocate_capture(struct encoder *e)
{
    if (allocate_buffers(e->fd, &e->cap, CAPTURE_BUFFERS)) {
        return -1;
    }
    for (unsigned i = 0; i < e->cap.count; i++) {
        if (queue_buffer(e->fd, &e->cap, i, 0, 0)) {
            return -1;
        }
    }
    note("CAPTURE %u buffers of %zu bytes", e->cap.count, e->cap.bufs[0].length);
    return 0;
}

static int write_header(struct encoder *e)
{
    uint8_t h[16];

    memcpy(h, "PYF1", 4);
    put_le32(h + 4, e->opt.codec);
    put_le32(h + 8, e->opt.width);
    put_le32(h + 12, e->opt.height);
    if (fwrite(h, 1, sizeof(h), e->out_file) != sizeof(h) || fflush(e->out_file)) {
        error("cannot write %s: %s", e->opt.out_path, strerror(errno));
        return -1;
    }
    return 0;
}

static int setup(struct encoder *e)
{
    if (set_capture_format(e) || check_output_format_offered(e) || set_output_format(e) ||
        read_formats(e) || set_frame_rate(e) || set_controls(e) ||
        subscribe(e->fd, V4L2_EVENT_EOS, "EOS") ||
        allocate_output(e) || allocate_capture(e) || write_header(e)) {
        return -1;
    }
    return stream(e->fd, &e->out, true) || stream(e->fd, &e->cap, true) ? -1 : 0;
}

/* ---- coded buffers ---- */

static char frame_type(uint32_t flags)
{
    return (flags & V4L2_BUF_FLAG_KEYFRAME) ? 'K' : (flags & V4L2_BUF_FLAG_PFRAME) ? 'P'
         : (flags & V4L2_BUF_FLAG_BFRAME) ? 'B' : '-';
}

static int emit_packet(struct encoder *e, const struct v4l2_buffer *v)
{
    const struct buffer *b = &e->cap.bufs[v->index];
    const struct v4l2_plane *plane = v->m.planes;
    uint64_t ts = buffer_timestamp_us(v);
    uint8_t len[4];

    if (plane->bytesused > b->length || plane->data_offset > plane->bytesused) {
        error("CAPTURE buffer %u: bytesused %u, data_offset %u, length %zu", v->index,
              plane->bytesused, plane->data_offset, b->length);
        return -1;
    }
    uint32_t size = plane->bytesused - plane->data_offset;
    put_le32(len, size);
    if (fwrite(len, 1, 4, e->out_file) != 4 ||
        fwrite(b->mem + plane->data_offset, 1, size, e->out_file) != size ||
        fflush(e->out_file)) {
        error("cannot write %s: %s", e->opt.out_path, strerror(errno));
        return -1;
    }
    if (!e->opt.summary) {
        printf("PACKET %lu %" PRIu64 " %" PRIu32 " %c\n", e->packets, ts, size,
               frame_type(v->flags));
    }
    e->packets++;
    return 0;
}

static int handle_capture_buffer(struct encoder *e, const struct v4l2_buffer *v)
{
    uint32_t bytesused = v->m.planes[0].bytesused;

    if (v->flags & V4L2_BUF_FLAG_ERROR) {
        error("CAPTURE buffer %u came back with ERROR (timestamp %ld.%06ld)",
              v->index, (long)v->timestamp.tv_sec, (long)v->timestamp.tv_usec);
        e->errors++;
    } else if (bytesused > v->m.planes[0].data_offset && emit_packet(e, v)) {
        return -1;
    }
    if (v->flags & V4L2_BUF_FLAG_LAST) {
        e->last_dequeued = true;
        e->finished = true;
        if (!e->stop_sent) {
            error("a LAST CAPTURE buffer before V4L2_ENC_CMD_STOP (%lu of %lu pictures "
                  "queued)", e->next_picture, e->total);
            return -1;
        }
        return 0;
    }
    return queue_buffer(e->fd, &e->cap, v->index, 0, 0);
}

static int dequeue_capture(struct encoder *e)
{
    struct v4l2_buffer v;
    struct v4l2_plane plane;
    int got;

    /* After LAST, DQBUF would only say EPIPE. */
    while (!e->last_dequeued) {
        got = dequeue_buffer(e->fd, &e->cap, &v, &plane);
        if (got <= 0) {
            return got;
        }
        if (handle_capture_buffer(e, &v)) {
            return -1;
        }
    }
    return 0;
}

static int handle_events(struct encoder *e)
{
    struct v4l2_event ev;
    int got;

    while ((got = dequeue_event(e->fd, &ev)) > 0) {
        if (ev.type == V4L2_EVENT_EOS) {
            e->eos_event = true;
        }
    }
    return got;
}

/* ---- feeding and draining ---- */

/* Picture i (of the file, looped) into OUTPUT buffer `index`, and queue it. */
static int queue_picture(struct encoder *e, unsigned index, unsigned long i)
{
    const uint8_t *src = e->raw + (i % e->file_pictures) * e->picture_size;

    copy_picture(e->dst, e->src, e->planes, e->out.bufs[index].mem, src);
    return queue_buffer(e->fd, &e->out, index, e->fmt.sizeimage, (uint64_t)i * PICTURE_STEP_US);
}

static int feed_output(struct encoder *e)
{
    int index;

    while (e->next_picture < e->total && (index = free_buffer(&e->out)) >= 0) {
        /*
         * A control goes to the device at once, while pictures queued
         * before it may still wait in the driver's m2m queue: it would
         * apply to one of them.  So a control waits until every OUTPUT
         * buffer is back, and applies to picture i exactly.
         */
        if (controls_due(e, e->next_picture) && e->out.queued > 0) {
            break;
        }
        if (picture_controls(e, e->next_picture) ||
            queue_picture(e, (unsigned)index, e->next_picture)) {
            return -1;
        }
        e->next_picture++;
    }
    return 0;
}

/*
 * The drain starts once every picture is queued and every OUTPUT buffer is
 * back (both queues stream from the start: the driver ignores the STOP
 * otherwise).
 */
static int maybe_stop(struct encoder *e)
{
    struct v4l2_encoder_cmd cmd = { .cmd = V4L2_ENC_CMD_STOP };

    if (e->stop_sent || e->last_dequeued || e->next_picture < e->total || e->out.queued > 0) {
        return 0;
    }
    if (IOCTL(e->fd, VIDIOC_ENCODER_CMD, &cmd, "V4L2_ENC_CMD_STOP")) {
        return -1;
    }
    note("drain started after %lu pictures, %lu packets", e->next_picture, e->packets);
    e->stop_sent = true;
    return 0;
}

/* ---- the loop ---- */

static const char *waiting_for(const struct encoder *e)
{
    if (e->stop_sent) {
        return "the LAST CAPTURE buffer after V4L2_ENC_CMD_STOP";
    }
    if (e->next_picture >= e->total) {
        return "the OUTPUT buffers to come back before V4L2_ENC_CMD_STOP";
    }
    return "coded buffers or free OUTPUT buffers";
}

static int wait_and_handle(struct encoder *e)
{
    short revents = 0;
    int got = poll_node(e->fd, poll_events(&e->out, &e->cap, e->last_dequeued), &revents);

    if (got == POLL_IDLE) {
        error("nothing happened for %d s while waiting for %s (%lu of %lu pictures queued, "
              "%u OUTPUT buffers with the driver, %lu packets)", IDLE_TIMEOUT_MS / 1000,
              waiting_for(e), e->next_picture, e->total, e->out.queued, e->packets);
        return -1;
    }
    if (got <= 0) {
        return got;
    }
    if (((revents & POLLPRI) && handle_events(e)) ||
        ((revents & POLLOUT) && dequeue_output(e->fd, &e->out, &e->errors)) ||
        ((revents & POLLIN) && dequeue_capture(e))) {
        return -1;
    }
    return 0;
}

static void check_changes(const struct encoder *e)
{
    for (unsigned k = 0; k < e->opt.force_keys; k++) {
        if (e->opt.force_key[k].at >= e->total) {
            warning("--force-key %lu: there are only %lu pictures", e->opt.force_key[k].at,
                    e->total);
        }
    }
    for (unsigned k = 0; k < e->opt.bitrate_changes; k++) {
        if (e->opt.bitrate_change[k].at >= e->total) {
            warning("--bitrate-change %lu: there are only %lu pictures",
                    e->opt.bitrate_change[k].at, e->total);
        }
    }
}

static int encode(struct encoder *e)
{
    e->out = (struct queue){ .type = V4L2_BUF_TYPE_VIDEO_OUTPUT_MPLANE, .name = "OUTPUT" };
    e->cap = (struct queue){ .type = V4L2_BUF_TYPE_VIDEO_CAPTURE_MPLANE, .name = "CAPTURE" };
    if (map_raw_file(e)) {
        return -1;
    }
    if (!(e->out_file = fopen(e->opt.out_path, "wb"))) {
        error("cannot create %s: %s", e->opt.out_path, strerror(errno));
        return -1;
    }
    check_changes(e);
    clock_gettime(CLOCK_MONOTONIC, &e->start);
    if (open_encoder(e) || setup(e)) {
        return -1;
    }
    while (!e->finished) {
        if (feed_output(e) || maybe_stop(e) || wait_and_handle(e)) {
            return -1;
        }
    }
    if (stream(e->fd, &e->out, false) || stream(e->fd, &e->cap, false)) {
        return -1;
    }
    if (!e->eos_event && handle_events(e) == 0 && !e->eos_event) {
        note("the drain ended without a V4L2_EVENT_EOS");
    }
    if (e->errors) {
        error("%lu buffers came back with ERROR", e->errors);
        return -1;
    }
    return 0;
}

/* ---- self-test of the picture layout and copy (runs anywhere) ---- */

static bool selftest_luma(uint32_t fourcc, uint32_t bpl, uint32_t height, uint32_t sizeimage,
                          size_t want)
{
    struct pic_format f = { fourcc, bpl, height, bpl, sizeimage, 1, { 0 } };
    size_t got = luma_plane_size(&f);
    char s[5];

    printf("selftest chroma offset %s bpl %u height %u sizeimage %u: %zu (want %zu): %s\n",
           fourcc_str(fourcc, s), bpl, height, sizeimage, got, want,
           got == want ? "ok" : "FAILED");
    return got == want;
}

/*
 * A 7x5 picture, packed with pattern(), copied into a buffer of `size` bytes
 * that holds 0xee.  `want` lists each plane's {offset, stride, row bytes,
 * rows} in the buffer, worked out by hand: every byte there must be the
 * pattern, every other byte still 0xee.
 */
static bool selftest_copy(const char *what, const struct pic_format *f, size_t size,
                          const size_t want[][4])
{
    struct plane_span s[MAX_PLANES], d[MAX_PLANES];
    unsigned n = packed_planes(f->fourcc, 7, 5, s);
    uint8_t packed[64], buf[256], expect[256];
    size_t psize = planes_extent(s, n);
    bool ok = psize <= sizeof(packed) && size <= sizeof(buf);

    if (buffer_planes(f, 7, 5, d) != n || !ok) {
        printf("selftest copy %s: plane count or sizes wrong: FAILED\n", what);
        return false;
    }
    for (unsigned p = 0; p < n; p++) {
        for (size_t r = 0; r < s[p].rows; r++) {
            for (size_t c = 0; c < s[p].row_bytes; c++) {
                packed[s[p].offset + r * s[p].stride + c] = pattern(p, r, c);
            }
        }
    }
    memset(buf, 0xee, size);
    memset(expect, 0xee, size);
    for (unsigned p = 0; p < n; p++) {
        for (size_t r = 0; r < want[p][3]; r++) {
            for (size_t c = 0; c < want[p][2]; c++) {
                expect[want[p][0] + r * want[p][1] + c] = pattern(p, r, c);
            }
        }
    }
    copy_picture(d, s, n, buf, packed);
    /* 7x5 luma, then 8x3 (NV12's CbCr pairs) or 2 x 4x3 chroma: 59 bytes either way. */
    ok = memcmp(buf, expect, size) == 0 && planes_extent(d, n) <= f->sizeimage && psize == 59;
    printf("selftest copy %s: packed %zu bytes, buffer extent %zu of %u: %s\n", what, psize,
           planes_extent(d, n), f->sizeimage, ok ? "ok" : "FAILED");
    return ok;
}

static int selftest(void)
{
    /*
     * Height 5, but the device's planes are 8 rows high (sizeimage 16 * 8 * 3 / 2):
     * the chroma is at 128, not at 16 * 5.
     */
    static const struct pic_format nv12_aligned = { V4L2_PIX_FMT_NV12, 16, 5, 16, 192, 1,
                                                    { 0 } };
    static const struct pic_format yu12_aligned = { V4L2_PIX_FMT_YUV420, 16, 5, 16, 192, 1,
                                                    { 0 } };
    /* V4L2's own layout of an odd height: 8 * 5 luma, (5 + 1) / 2 chroma rows. */
    static const struct pic_format nv12_plain = { V4L2_PIX_FMT_NV12, 7, 5, 8, 64, 1, { 0 } };
    static const struct pic_format yu12_plain = { V4L2_PIX_FMT_YUV420, 7, 5, 8, 64, 1, { 0 } };
    static const size_t nv12_a[][4] = { { 0, 16, 7, 5 }, { 128, 16, 8, 3 } };
    static const size_t yu12_a[][4] = { { 0, 16, 7, 5 }, { 128, 8, 4, 3 }, { 160, 8, 4, 3 } };
    static const size_t nv12_p[][4] = { { 0, 8, 7, 5 }, { 40, 8, 8, 3 } };
    static const size_t yu12_p[][4] = { { 0, 8, 7, 5 }, { 40, 4, 4, 3 }, { 52, 4, 4, 3 } };
    bool ok = true;

    ok &= selftest_luma(V4L2_PIX_FMT_NV12, 320, 240, 115200, 76800);    /* V4L2's layout */
    ok &= selftest_luma(V4L2_PIX_FMT_NV12, 320, 240, 122880, 81920);    /* height 256 */
    ok &= selftest_luma(V4L2_PIX_FMT_YUV420, 1920, 1080, 3133440, 2088960); /* 1088 */
    ok &= selftest_luma(V4L2_PIX_FMT_NV12, 320, 241, 115840, 77120);    /* odd: V4L2's */
    ok &= selftest_luma(V4L2_PIX_FMT_NV12, 320, 240, 119296, 76800);    /* tail padding */
    ok &= selftest_luma(V4L2_PIX_FMT_NV12, 320, 240, 96000, 76800);     /* too small */
    ok &= selftest_luma(V4L2_PIX_FMT_YUV420, 321, 241, 123392, 82176);  /* odd stride, 256 */
    ok &= selftest_luma(V4L2_PIX_FMT_YUV420, 321, 241, 116323, 77361);  /* odd: V4L2's */
    ok &= selftest_copy("NV12 aligned height", &nv12_aligned, 192, nv12_a);
    ok &= selftest_copy("YU12 aligned height", &yu12_aligned, 192, yu12_a);
    ok &= selftest_copy("NV12 V4L2 layout", &nv12_plain, 64, nv12_p);
    ok &= selftest_copy("YU12 V4L2 layout", &yu12_plain, 64, yu12_p);
    return ok ? 0 : 1;
}

/* ---- command line ---- */

static void usage(FILE *to)
{
    fprintf(to,
            "usage: " PROG " [options] --codec C --format F --size WxH RAW_FILE OUT_FILE\n"
            "       " PROG " --selftest\n"
            "  --device PATH       encoder node (default: the first /dev/videoN that encodes\n"
            "                      to the codec)\n"
            "  --codec H264|HEVC|VP80|VP90   the coded format\n"
            "  --format NV12|YU12  the raw pictures' format\n"
            "  --size WxH          the raw pictures' size\n"
            "  --fps N             frame rate for S_PARM (default %d; then a refusal is\n"
            "                      only a warning)\n"
            "  --bitrate BPS       V4L2_CID_MPEG_VIDEO_BITRATE (must be accepted)\n"
            "  --peak BPS          V4L2_CID_MPEG_VIDEO_BITRATE_PEAK\n"
            "  --mode cbr|vbr      V4L2_CID_MPEG_VIDEO_BITRATE_MODE\n"
            "  --profile N         V4L2_CID_MPEG_VIDEO_H264_PROFILE (V4L2's menu index)\n"
            "  --level N           V4L2_CID_MPEG_VIDEO_H264_LEVEL (V4L2's menu index)\n"
            "  --prepend-sps       V4L2_CID_MPEG_VIDEO_PREPEND_SPSPPS_TO_IDR = 1\n"
            "  --force-key I[,J..] V4L2_CID_MPEG_VIDEO_FORCE_KEY_FRAME before picture I, J..\n"
            "  --bitrate-change I:BPS  set the bitrate to BPS before picture I (repeatable)\n"
            "  --frames N          encode N pictures (default: the file's; beyond, loop)\n"
            "  --summary           no PACKET lines, only the DONE line\n"
            "  --selftest          check the picture layout and copy, then exit\n",
            DEFAULT_FPS);
}

static int parse_index(const char *s, unsigned long *v)
{
    long n;

    if (parse_number(s, &n)) {
        return -1;
    }
    *v = (unsigned long)n;
    return 0;
}

static int parse_bps(const char *s, long *v)
{
    return (parse_number(s, v) || *v < 1 || *v > INT32_MAX) ? -1 : 0;
}

static int parse_size(const char *s, struct options *o)
{
    char *x = strchr(s, 'x');
    long w, h;

    if (!x) {
        return -1;
    }
    *x = '\0';
    if (parse_number(s, &w) || parse_number(x + 1, &h) || w < 1 || h < 1 ||
        w > 16384 || h > 16384) {
        return -1;
    }
    o->width = (uint32_t)w;
    o->height = (uint32_t)h;
    return 0;
}

static int parse_codec(const char *s, uint32_t *fourcc)
{
    static const struct { const char *name; uint32_t fourcc; } codecs[] = {
        { "H264", V4L2_PIX_FMT_H264 }, { "HEVC", V4L2_PIX_FMT_HEVC },
        { "VP80", V4L2_PIX_FMT_VP8 }, { "VP90", V4L2_PIX_FMT_VP9 },
    };

    for (unsigned i = 0; i < sizeof(codecs) / sizeof(codecs[0]); i++) {
        if (strcmp(s, codecs[i].name) == 0) {
            *fourcc = codecs[i].fourcc;
            return 0;
        }
    }
    return -1;
}

static int parse_mode(const char *s, long *mode)
{
    if (strcmp(s, "cbr") == 0) {
        *mode = V4L2_MPEG_VIDEO_BITRATE_MODE_CBR;
    } else if (strcmp(s, "vbr") == 0) {
        *mode = V4L2_MPEG_VIDEO_BITRATE_MODE_VBR;
    } else {
        return -1;
    }
    return 0;
}

/* "I[,J...]": appended to the --force-key list. */
static int parse_force_keys(char *s, struct options *o)
{
    for (char *item = strtok(s, ","); item; item = strtok(NULL, ",")) {
        if (o->force_keys == MAX_CHANGES ||
            parse_index(item, &o->force_key[o->force_keys].at)) {
            return -1;
        }
        o->force_keys++;
    }
    return o->force_keys ? 0 : -1;
}

/* "I:BPS": appended to the --bitrate-change list. */
static int parse_bitrate_change(char *s, struct options *o)
{
    char *colon = strchr(s, ':');
    struct change *c = &o->bitrate_change[o->bitrate_changes];

    if (!colon || o->bitrate_changes == MAX_CHANGES) {
        return -1;
    }
    *colon = '\0';
    if (parse_index(s, &c->at) || parse_bps(colon + 1, &c->value)) {
        return -1;
    }
    o->bitrate_changes++;
    return 0;
}

/* Returns 0 to run, 1 for --selftest, -1 on a usage error. */
static int parse_options(int argc, char **argv, struct options *o)
{
    static const struct option longs[] = {
        { "device", required_argument, NULL, 'd' },
        { "codec", required_argument, NULL, 'c' },
        { "format", required_argument, NULL, 'f' },
        { "size", required_argument, NULL, 's' },
        { "fps", required_argument, NULL, 'r' },
        { "bitrate", required_argument, NULL, 'b' },
        { "peak", required_argument, NULL, 'p' },
        { "mode", required_argument, NULL, 'm' },
        { "profile", required_argument, NULL, 'P' },
        { "level", required_argument, NULL, 'L' },
        { "prepend-sps", no_argument, NULL, 'S' },
        { "force-key", required_argument, NULL, 'k' },
        { "bitrate-change", required_argument, NULL, 'B' },
        { "frames", required_argument, NULL, 'n' },
        { "summary", no_argument, NULL, 'q' },
        { "selftest", no_argument, NULL, 't' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    int c, bad = 0;

    *o = (struct options){ .fps = DEFAULT_FPS, .bitrate = -1, .peak = -1, .mode = -1,
                           .profile = -1, .level = -1 };
    while ((c = getopt_long(argc, argv, "", longs, NULL)) != -1) {
        switch (c) {
        case 'd': o->device = optarg; break;
        case 'c': bad |= parse_codec(optarg, &o->codec); break;
        case 'f': bad |= parse_format(optarg, &o->raw_fourcc); break;
        case 's': bad |= parse_size(optarg, o); break;
        case 'r':
            bad |= parse_number(optarg, &o->fps) || o->fps < 1 || o->fps > 1000;
            o->fps_given = true;
            break;
        case 'b': bad |= parse_bps(optarg, &o->bitrate); break;
        case 'p': bad |= parse_bps(optarg, &o->peak); break;
        case 'm': bad |= parse_mode(optarg, &o->mode); break;
        case 'P': bad |= parse_number(optarg, &o->profile); break;
        case 'L': bad |= parse_number(optarg, &o->level); break;
        case 'S': o->prepend_sps = true; break;
        case 'k': bad |= parse_force_keys(optarg, o); break;
        case 'B': bad |= parse_bitrate_change(optarg, o); break;
        case 'n': bad |= parse_number(optarg, &o->frames) || o->frames < 1; break;
        case 'q': o->summary = true; break;
        case 't': return 1;
        case 'h': usage(stdout); exit(0);
        default: bad = 1; break;
        }
    }
    if (bad || optind != argc - 2 || !o->codec || !o->raw_fourcc || !o->width) {
        return -1;
    }
    o->raw_path = argv[optind];
    o->out_path = argv[optind + 1];
    return 0;
}

int main(int argc, char **argv)
{
    static struct encoder e = { .fd = -1 };
    struct timespec end;
    int mode, rc;

    /* Line by line: the host reads the console as we go, and may kill us. */
    setvbuf(stdout, NULL, _IOLBF, 0);
    mode = parse_options(argc, argv, &e.opt);
    if (mode < 0) {
        usage(stderr);
        return 2;
    }
    if (mode == 1) {
        return selftest();
    }
    clock_gettime(CLOCK_MONOTONIC, &e.start);
    rc = encode(&e) ? 1 : 0;
    clock_gettime(CLOCK_MONOTONIC, &end);
    if (e.out_file && fclose(e.out_file) != 0 && rc == 0) {
        error("cannot write %s: %s", e.opt.out_path, strerror(errno));
        rc = 1;
    }
    printf("DONE packets=%lu rc=%d seconds=%.3f\n", e.packets, rc,
           seconds_between(&e.start, &end));
    /* Closing the node stops both queues and frees every buffer. */
    if (e.fd >= 0) {
        close(e.fd);
    }
    return rc;
}
