{
  "targets": [
    {
      "target_name": "sha256_thread",
      "sources": ["sha256_thread.c"],
      "cflags": ["-O2", "-Wall", "-Wextra", "-std=gnu11"]
    }
  ]
}
