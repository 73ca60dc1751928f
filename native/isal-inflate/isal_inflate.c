/*
 * Gunzip of one DDK chunk with ISA-L's inflate (igzip), on a thread of its own, straight from
 * the file holding it to the scratch disk file at the chunk's offset. All-zero 4 KiB blocks are
 * not written (they stay holes), as the zlib path in inflate-worker.ts does. ISA-L inflates about
 * 1.6 times as fast as zlib here and checks the CRC-32 with carry-less multiplies; the compressed
 * and decompressed bytes never enter JavaScript, so there is no garbage to collect and no message
 * per piece. JavaScript learns only how far the chunk is written, and its end or failure.
 *
 * start(path, extents, outFd, outOffset, limit, onEvent) -> { cancel() }
 *   extents: [[offset, length], ...] where the chunk's gzip bytes lie in `path`, in order.
 *   onEvent(kind, value, message): ('progress', bytesWritten), ('done', size),
 *   ('data', 0, message) for corrupt or truncated gzip data, ('overflow', 0) when the chunk
 *   decompresses to more than `limit` bytes, ('input', errno, message) when `path` cannot be
 *   read, ('output', errno, message) when the scratch file cannot be written, ('cancelled', 0).
 *   Exactly one event other than 'progress' comes, last.
 */
#define _GNU_SOURCE
#define NAPI_VERSION 8
#include <errno.h>
#include <fcntl.h>
#include <isa-l/igzip_lib.h>
#include <node_api.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define IN_SIZE (1 << 20)
#define OUT_SIZE (1 << 20)
#define BLOCK 4096
/* At most one progress event per this many bytes written: readers wait on whole megabytes anyway. */
#define PROGRESS_STEP (4 << 20)

typedef struct {
  uint64_t offset, length;
} extent_t;

typedef struct {
  char *path;
  extent_t *extents;
  uint32_t n_extents;
  int out_fd;
  uint64_t out_offset, limit;
  napi_threadsafe_function tsfn;
  atomic_int cancelled;
  atomic_int refs; /* the thread and the JS handle each hold one */
} job_t;

typedef struct {
  const char *kind;
  double value;
  char message[200];
} event_t;

static void job_free(job_t *job) {
  free(job->path);
  free(job->extents);
  free(job);
}

static void job_unref(job_t *job) {
  if (atomic_fetch_sub(&job->refs, 1) == 1) job_free(job);
}

static void post(job_t *job, const char *kind, double value, const char *message) {
  event_t *ev = malloc(sizeof *ev);
  if (!ev) return;
  ev->kind = kind;
  ev->value = value;
  snprintf(ev->message, sizeof ev->message, "%s", message ? message : "");
  if (napi_call_threadsafe_function(job->tsfn, ev, napi_tsfn_blocking) != napi_ok) free(ev);
}

static int all_zero(const uint8_t *p, size_t n) {
  const uint64_t *q = (const uint64_t *)p;
  uint64_t acc = 0;
  size_t words = n / 8;
  for (size_t i = 0; i < words; i++) acc |= q[i];
  for (size_t i = words * 8; i < n; i++) acc |= p[i];
  return acc == 0;
}

static int write_all(int fd, const uint8_t *buf, size_t len, uint64_t pos) {
  while (len > 0) {
    ssize_t n = pwrite(fd, buf, len, (off_t)pos);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    buf += n;
    len -= (size_t)n;
    pos += (uint64_t)n;
  }
  return 0;
}

/* Write [0, len) of buf at pos, leaving all-zero blocks unwritten. */
static int write_sparse(int fd, const uint8_t *buf, size_t len, uint64_t pos) {
  size_t run = SIZE_MAX;
  for (size_t off = 0; off < len; off += BLOCK) {
    size_t end = off + BLOCK < len ? off + BLOCK : len;
    int zero = all_zero(buf + off, end - off);
    if (!zero && run == SIZE_MAX) run = off;
    if (zero && run != SIZE_MAX) {
      int err = write_all(fd, buf + run, off - run, pos + run);
      if (err) return err;
      run = SIZE_MAX;
    }
  }
  return run == SIZE_MAX ? 0 : write_all(fd, buf + run, len - run, pos + run);
}

/* zlib's wording, so both inflaters fail a corrupt chunk with the same message. */
static const char *inflate_error(int ret) {
  switch (ret) {
  case ISAL_INVALID_BLOCK: return "invalid block type";
  case ISAL_INVALID_SYMBOL: return "invalid code";
  case ISAL_INVALID_LOOKBACK: return "invalid distance too far back";
  case ISAL_INVALID_WRAPPER: return "incorrect header check";
  case ISAL_UNSUPPORTED_METHOD: return "unknown compression method";
  case ISAL_INCORRECT_CHECKSUM: return "incorrect data check";
  case ISAL_NEED_DICT: return "need dictionary";
  default: return "invalid compressed data";
  }
}

static void run(job_t *job) {
  char msg[160];
  int in_fd = open(job->path, O_RDONLY | O_CLOEXEC);
  if (in_fd < 0) {
    int e = errno;
    snprintf(msg, sizeof msg, "cannot open %s: %s", job->path, strerror(e));
    post(job, "input", e, msg);
    return;
  }
  uint8_t *in = malloc(IN_SIZE), *out = malloc(OUT_SIZE);
  struct inflate_state *st = malloc(sizeof *st);
  if (!in || !out || !st) {
    post(job, "output", ENOMEM, "out of memory");
    goto end;
  }
  isal_inflate_init(st);
  st->crc_flag = ISAL_GZIP;
  uint64_t total = 0, reported = 0;
  /* Between members: the next non-zero byte starts another member, zero bytes are padding (as Node's zlib). */
  int between = 0;
  for (uint32_t x = 0; x < job->n_extents; x++) {
    uint64_t pos = job->extents[x].offset, left = job->extents[x].length;
    while (left > 0) {
      if (atomic_load(&job->cancelled)) {
        post(job, "cancelled", 0, NULL);
        goto end;
      }
      size_t want = left < IN_SIZE ? (size_t)left : IN_SIZE;
      ssize_t n = pread(in_fd, in, want, (off_t)pos);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        int e = n < 0 ? errno : 0;
        snprintf(msg, sizeof msg, "read at offset %llu: %s", (unsigned long long)pos, e ? strerror(e) : "unexpected end of file");
        post(job, "input", e, msg);
        goto end;
      }
      pos += (uint64_t)n;
      left -= (uint64_t)n;
      st->next_in = in;
      st->avail_in = (uint32_t)n;
      while (st->avail_in > 0) {
        if (between) {
          if (*st->next_in == 0) {
            st->next_in++;
            st->avail_in--;
            continue;
          }
          /* Another member must start with gzip's magic; zlib names anything else this way. */
          if (st->next_in[0] != 0x1f || (st->avail_in > 1 && st->next_in[1] != 0x8b)) {
            post(job, "data", 0, "incorrect header check");
            goto end;
          }
          isal_inflate_reset(st);
          st->crc_flag = ISAL_GZIP;
          between = 0;
        }
        uint32_t avail_before = st->avail_in;
        st->next_out = out;
        st->avail_out = OUT_SIZE;
        int ret = isal_inflate(st);
        if (ret < 0) {
          post(job, "data", 0, inflate_error(ret));
          goto end;
        }
        size_t got = OUT_SIZE - st->avail_out;
        if (got > 0) {
          if (total + got > job->limit) {
            post(job, "overflow", 0, NULL);
            goto end;
          }
          int err = write_sparse(job->out_fd, out, got, job->out_offset + total);
          if (err) {
            snprintf(msg, sizeof msg, "write: %s", strerror(err));
            post(job, "output", err, msg);
            goto end;
          }
          total += got;
          if (total - reported >= PROGRESS_STEP) {
            post(job, "progress", (double)total, NULL);
            reported = total;
          }
        }
        if (st->block_state == ISAL_BLOCK_FINISH) between = 1;
        else if (got == 0 && st->avail_in == avail_before) {
          /* Neither input taken nor output made: the stream cannot go on. */
          post(job, "data", 0, "invalid compressed data");
          goto end;
        }
      }
    }
  }
  if (!between) post(job, "data", 0, "unexpected end of file");
  else post(job, "done", (double)total, NULL);
end:
  free(in);
  free(out);
  free(st);
  close(in_fd);
}

static void *thread_main(void *arg) {
  job_t *job = arg;
  pthread_setname_np(pthread_self(), "isal-inflate");
  run(job);
  napi_release_threadsafe_function(job->tsfn, napi_tsfn_release);
  job_unref(job);
  return NULL;
}

static void call_js(napi_env env, napi_value cb, void *context, void *data) {
  (void)context;
  event_t *ev = data;
  if (env && cb) {
    napi_value argv[3], undef;
    napi_create_string_utf8(env, ev->kind, NAPI_AUTO_LENGTH, &argv[0]);
    napi_create_double(env, ev->value, &argv[1]);
    napi_create_string_utf8(env, ev->message, NAPI_AUTO_LENGTH, &argv[2]);
    napi_get_undefined(env, &undef);
    napi_call_function(env, undef, cb, 3, argv, NULL);
  }
  free(ev);
}

static napi_value throw_type(napi_env env, const char *message) {
  napi_throw_type_error(env, NULL, message);
  return NULL;
}

static int get_u64(napi_env env, napi_value v, uint64_t *out) {
  double d;
  if (napi_get_value_double(env, v, &d) != napi_ok || !(d >= 0) || d > 9007199254740991.0 || d != (double)(uint64_t)d) return 0;
  *out = (uint64_t)d;
  return 1;
}

static napi_value cancel(napi_env env, napi_callback_info info) {
  napi_value self;
  void *data;
  napi_get_cb_info(env, info, NULL, NULL, &self, NULL);
  if (napi_unwrap(env, self, &data) == napi_ok) atomic_store(&((job_t *)data)->cancelled, 1);
  return NULL;
}

static void finalize_handle(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  job_unref(data);
}

static napi_value start(napi_env env, napi_callback_info info) {
  size_t argc = 6;
  napi_value argv[6];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc != 6) return throw_type(env, "start(path, extents, outFd, outOffset, limit, onEvent)");
  size_t path_len;
  if (napi_get_value_string_utf8(env, argv[0], NULL, 0, &path_len) != napi_ok) return throw_type(env, "path must be a string");
  uint32_t n_extents;
  if (napi_get_array_length(env, argv[1], &n_extents) != napi_ok) return throw_type(env, "extents must be an array");
  uint64_t out_fd, out_offset, limit;
  if (!get_u64(env, argv[2], &out_fd) || out_fd > INT32_MAX || !get_u64(env, argv[3], &out_offset) || !get_u64(env, argv[4], &limit)) {
    return throw_type(env, "outFd, outOffset and limit must be non-negative integers");
  }
  job_t *job = calloc(1, sizeof *job);
  if (!job) return throw_type(env, "out of memory");
  job->path = malloc(path_len + 1);
  job->extents = calloc(n_extents ? n_extents : 1, sizeof *job->extents);
  if (!job->path || !job->extents) {
    job_free(job);
    return throw_type(env, "out of memory");
  }
  napi_get_value_string_utf8(env, argv[0], job->path, path_len + 1, NULL);
  for (uint32_t i = 0; i < n_extents; i++) {
    napi_value pair, off, len;
    napi_get_element(env, argv[1], i, &pair);
    if (napi_get_element(env, pair, 0, &off) != napi_ok || napi_get_element(env, pair, 1, &len) != napi_ok ||
        !get_u64(env, off, &job->extents[i].offset) || !get_u64(env, len, &job->extents[i].length)) {
      job_free(job);
      return throw_type(env, "each extent must be [offset, length]");
    }
  }
  job->n_extents = n_extents;
  job->out_fd = (int)out_fd;
  job->out_offset = out_offset;
  job->limit = limit;
  atomic_init(&job->cancelled, 0);
  atomic_init(&job->refs, 2);
  napi_value name;
  napi_create_string_utf8(env, "isal_inflate", NAPI_AUTO_LENGTH, &name);
  if (napi_create_threadsafe_function(env, argv[5], NULL, name, 0, 1, NULL, NULL, NULL, call_js, &job->tsfn) != napi_ok) {
    job_free(job);
    return throw_type(env, "onEvent must be a function");
  }
  napi_value handle, fn;
  napi_create_object(env, &handle);
  napi_create_function(env, "cancel", NAPI_AUTO_LENGTH, cancel, NULL, &fn);
  napi_set_named_property(env, handle, "cancel", fn);
  napi_wrap(env, handle, job, finalize_handle, NULL, NULL);
  pthread_t thread;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  int err = pthread_create(&thread, &attr, thread_main, job);
  pthread_attr_destroy(&attr);
  if (err) {
    napi_release_threadsafe_function(job->tsfn, napi_tsfn_abort);
    job_unref(job);
    napi_throw_error(env, NULL, strerror(err));
    return NULL;
  }
  return handle;
}

NAPI_MODULE_INIT() {
  napi_value fn;
  napi_create_function(env, "start", NAPI_AUTO_LENGTH, start, NULL, &fn);
  napi_set_named_property(env, exports, "start", fn);
  return exports;
}
