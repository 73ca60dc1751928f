import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 300_000,
    // Tests share loop devices, mounts and one dockerd: files run one after another.
    fileParallelism: false,
  },
});
