/*
 * SHA-256 of a stream on a thread of its own. Hashing the layer on Node's main thread took a
 * quarter of that thread in the export's tail, while the second core sat partly idle; here the
 * main thread only queues each piece (a pointer and a length) and goes on. The digest is
 * OpenSSL's, the one Node's crypto uses: Node exports its OpenSSL, so nothing else is linked.
 *
 * create(onHashed) -> { update(buffer), wait(count), digest(), close() }
 *   update(buffer): queue the buffer's bytes; returns how many pieces are hashed so far. The bytes
 *     are read later, on the thread: the caller keeps the buffer alive and unchanged until then.
 *   wait(count): false when `count` pieces are hashed already; else true, and onHashed(hashed)
 *     comes once they are (one call per wait). The event loop is kept alive while a wait is open.
 *   digest(): 'hex' once every queued piece is hashed (throws before); ends the hash.
 *   close(): stops the thread (it finishes the piece at hand) and drops what is queued.
 */
#define _GNU_SOURCE
#define NAPI_VERSION 8
#include <node_api.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
  const uint8_t *p;
  size_t n;
} piece_t;

typedef struct {
  pthread_mutex_t lock;
  pthread_cond_t more;
  /* Queued pieces are queue[head, tail). */
  piece_t *queue;
  size_t cap, head, tail;
  uint64_t queued, hashed;
  /* Post onHashed when `hashed` reaches it; 0 when no wait is open. */
  uint64_t notify_at;
  int closing, closed, idle, finished, failed;
  EVP_MD_CTX *md;
  pthread_t thread;
  napi_threadsafe_function tsfn;
  atomic_int refs; /* the JS handle and the threadsafe function each hold one */
} hasher_t;

static void hasher_unref(hasher_t *h) {
  if (atomic_fetch_sub(&h->refs, 1) != 1) return;
  pthread_mutex_destroy(&h->lock);
  pthread_cond_destroy(&h->more);
  EVP_MD_CTX_free(h->md);
  free(h->queue);
  free(h);
}

static void *thread_main(void *arg) {
  hasher_t *h = arg;
  pthread_setname_np(pthread_self(), "sha256");
  pthread_mutex_lock(&h->lock);
  for (;;) {
    while (h->head == h->tail && !h->closing) {
      h->idle = 1;
      pthread_cond_wait(&h->more, &h->lock);
      h->idle = 0;
    }
    if (h->closing) break;
    piece_t piece = h->queue[h->head];
    pthread_mutex_unlock(&h->lock);
    int ok = EVP_DigestUpdate(h->md, piece.p, piece.n);
    pthread_mutex_lock(&h->lock);
    if (!ok) h->failed = 1;
    h->head++;
    h->hashed++;
    if (h->notify_at && h->hashed >= h->notify_at) {
      h->notify_at = 0;
      napi_call_threadsafe_function(h->tsfn, (void *)(uintptr_t)h->hashed, napi_tsfn_nonblocking);
    }
  }
  pthread_mutex_unlock(&h->lock);
  return NULL;
}

static void call_js(napi_env env, napi_value cb, void *context, void *data) {
  hasher_t *h = context;
  if (!env || !cb || h->closed) return;
  napi_unref_threadsafe_function(env, h->tsfn);
  napi_value argv[1], undef;
  napi_create_double(env, (double)(uintptr_t)data, &argv[0]);
  napi_get_undefined(env, &undef);
  napi_call_function(env, undef, cb, 1, argv, NULL);
}

static void finalize_tsfn(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  hasher_unref(data);
}

static void stop(hasher_t *h) {
  if (h->closed) return;
  pthread_mutex_lock(&h->lock);
  h->closing = 1;
  pthread_cond_signal(&h->more);
  pthread_mutex_unlock(&h->lock);
  pthread_join(h->thread, NULL);
  h->closed = 1;
  napi_release_threadsafe_function(h->tsfn, napi_tsfn_abort);
}

static void finalize_handle(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  stop(data);
  hasher_unref(data);
}

static hasher_t *self_of(napi_env env, napi_callback_info info, size_t *argc, napi_value *argv) {
  napi_value self;
  void *data = NULL;
  napi_get_cb_info(env, info, argc, argv, &self, NULL);
  if (napi_unwrap(env, self, &data) != napi_ok || !data) {
    napi_throw_type_error(env, NULL, "not a sha256_thread handle");
    return NULL;
  }
  hasher_t *h = data;
  if (h->closed || h->finished) {
    napi_throw_error(env, NULL, h->closed ? "the hash is closed" : "the hash is finished");
    return NULL;
  }
  return h;
}

static napi_value update(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  hasher_t *h = self_of(env, info, &argc, argv);
  if (!h) return NULL;
  void *p;
  size_t n;
  if (argc != 1 || napi_get_buffer_info(env, argv[0], &p, &n) != napi_ok) {
    napi_throw_type_error(env, NULL, "update(buffer)");
    return NULL;
  }
  pthread_mutex_lock(&h->lock);
  if (h->tail == h->cap) {
    if (h->head > 0) {
      memmove(h->queue, h->queue + h->head, (h->tail - h->head) * sizeof *h->queue);
      h->tail -= h->head;
      h->head = 0;
    } else {
      size_t cap = h->cap ? h->cap * 2 : 1024;
      piece_t *q = realloc(h->queue, cap * sizeof *q);
      if (!q) {
        pthread_mutex_unlock(&h->lock);
        napi_throw_error(env, NULL, "out of memory");
        return NULL;
      }
      h->queue = q;
      h->cap = cap;
    }
  }
  h->queue[h->tail++] = (piece_t){p, n};
  h->queued++;
  /* A busy thread finds the piece on its own: no wake-up (a system call) per piece. */
  if (h->idle) pthread_cond_signal(&h->more);
  double hashed = (double)h->hashed;
  pthread_mutex_unlock(&h->lock);
  napi_value out;
  napi_create_double(env, hashed, &out);
  return out;
}

static napi_value wait_for(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  hasher_t *h = self_of(env, info, &argc, argv);
  if (!h) return NULL;
  double count;
  if (argc != 1 || napi_get_value_double(env, argv[0], &count) != napi_ok || !(count >= 0)) {
    napi_throw_type_error(env, NULL, "wait(count)");
    return NULL;
  }
  pthread_mutex_lock(&h->lock);
  int waiting = (double)h->hashed < count;
  if (waiting) h->notify_at = (uint64_t)count;
  pthread_mutex_unlock(&h->lock);
  if (waiting) napi_ref_threadsafe_function(env, h->tsfn);
  napi_value out;
  napi_get_boolean(env, waiting, &out);
  return out;
}

static napi_value digest(napi_env env, napi_callback_info info) {
  size_t argc = 0;
  hasher_t *h = self_of(env, info, &argc, NULL);
  if (!h) return NULL;
  pthread_mutex_lock(&h->lock);
  int pending = h->hashed != h->queued, failed = h->failed;
  pthread_mutex_unlock(&h->lock);
  if (pending) {
    napi_throw_error(env, NULL, "digest() before every piece is hashed");
    return NULL;
  }
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (failed || !EVP_DigestFinal_ex(h->md, md, &len)) {
    napi_throw_error(env, NULL, "OpenSSL's SHA-256 failed");
    return NULL;
  }
  h->finished = 1;
  char hex[2 * EVP_MAX_MD_SIZE + 1];
  for (unsigned int i = 0; i < len; i++) {
    hex[2 * i] = "0123456789abcdef"[md[i] >> 4];
    hex[2 * i + 1] = "0123456789abcdef"[md[i] & 15];
  }
  napi_value out;
  napi_create_string_latin1(env, hex, 2 * len, &out);
  return out;
}

static napi_value close_handle(napi_env env, napi_callback_info info) {
  napi_value self;
  void *data = NULL;
  napi_get_cb_info(env, info, NULL, NULL, &self, NULL);
  if (napi_unwrap(env, self, &data) == napi_ok && data) stop(data);
  return NULL;
}

static napi_value create(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  napi_valuetype type;
  if (argc != 1 || napi_typeof(env, argv[0], &type) != napi_ok || type != napi_function) {
    napi_throw_type_error(env, NULL, "create(onHashed)");
    return NULL;
  }
  hasher_t *h = calloc(1, sizeof *h);
  if (!h || !(h->md = EVP_MD_CTX_new()) || !EVP_DigestInit_ex(h->md, EVP_sha256(), NULL)) {
    if (h) EVP_MD_CTX_free(h->md);
    free(h);
    napi_throw_error(env, NULL, "cannot start OpenSSL's SHA-256");
    return NULL;
  }
  pthread_mutex_init(&h->lock, NULL);
  pthread_cond_init(&h->more, NULL);
  atomic_init(&h->refs, 2);
  napi_value name;
  napi_create_string_utf8(env, "sha256_thread", NAPI_AUTO_LENGTH, &name);
  if (napi_create_threadsafe_function(env, argv[0], NULL, name, 0, 1, h, finalize_tsfn, h, call_js, &h->tsfn) != napi_ok) {
    h->refs = 1;
    hasher_unref(h);
    napi_throw_error(env, NULL, "cannot create the threadsafe function");
    return NULL;
  }
  /* Only an open wait keeps the process alive. */
  napi_unref_threadsafe_function(env, h->tsfn);
  int err = pthread_create(&h->thread, NULL, thread_main, h);
  if (err) {
    h->closed = 1;
    napi_release_threadsafe_function(h->tsfn, napi_tsfn_abort);
    hasher_unref(h);
    napi_throw_error(env, NULL, strerror(err));
    return NULL;
  }
  napi_value handle, fn;
  napi_create_object(env, &handle);
  const struct {
    const char *name;
    napi_callback cb;
  } methods[] = {{"update", update}, {"wait", wait_for}, {"digest", digest}, {"close", close_handle}};
  for (size_t i = 0; i < sizeof methods / sizeof *methods; i++) {
    napi_create_function(env, methods[i].name, NAPI_AUTO_LENGTH, methods[i].cb, NULL, &fn);
    napi_set_named_property(env, handle, methods[i].name, fn);
  }
  napi_wrap(env, handle, h, finalize_handle, NULL, NULL);
  return handle;
}

NAPI_MODULE_INIT() {
  napi_value fn;
  napi_create_function(env, "create", NAPI_AUTO_LENGTH, create, NULL, &fn);
  napi_set_named_property(env, exports, "create", fn);
  return exports;
}
