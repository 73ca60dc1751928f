import { describe, expect, it } from 'vitest';
import { credentialsFromEnv, isLoopback, parseChallenge, parsePushRef } from '../../src/docker/registry.js';

describe('push references', () => {
  it.each([
    ['127.0.0.1:5000/ddk/test:1', { registry: '127.0.0.1:5000', name: 'ddk/test', tag: '1' }],
    ['registry.example.com/xs65', { registry: 'registry.example.com', name: 'xs65', tag: 'latest' }],
    ['localhost/a/b/c:x.y', { registry: 'localhost', name: 'a/b/c', tag: 'x.y' }],
    // As docker: no registry host means Docker Hub, and a single name lives under library/.
    ['ddk:8.2', { registry: 'docker.io', name: 'library/ddk', tag: '8.2' }],
    ['vates/ddk:8.2', { registry: 'docker.io', name: 'vates/ddk', tag: '8.2' }],
  ])('%s', (ref, expected) => {
    expect(parsePushRef(ref)).toEqual({ ...expected, ref: `${expected.registry}/${expected.name}:${expected.tag}` });
  });

  it('refuses digests and bad names, naming the reference', () => {
    expect(() => parsePushRef('r.example.com/x@sha256:00')).toThrow(/tag "r\.example\.com\/x@sha256:00"/);
    expect(() => parsePushRef('r.example.com/UPPER:1')).toThrow(/not a valid repository name/);
  });
});

describe('which registries may be plain HTTP (as docker: loopback only)', () => {
  it.each([
    ['127.0.0.1:5000', true], ['127.8.9.10', true], ['localhost:5000', true], ['[::1]:5000', true],
    ['registry.example.com', false], ['10.0.0.1:5000', false], ['localhost.example.com', false], ['128.0.0.1', false],
  ])('%s → %s', (host, loopback) => {
    expect(isLoopback(host)).toBe(loopback);
  });
});

describe('WWW-Authenticate', () => {
  it('Bearer with quoted values holding commas and colons', () => {
    expect(parseChallenge('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:a/b:pull,push"')).toEqual({
      scheme: 'bearer',
      params: { realm: 'https://auth.docker.io/token', service: 'registry.docker.io', scope: 'repository:a/b:pull,push' },
    });
  });
  it('Basic, token68-less, unquoted and escaped values', () => {
    expect(parseChallenge('Basic realm="ddk \\"test\\""')).toEqual({ scheme: 'basic', params: { realm: 'ddk "test"' } });
    expect(parseChallenge('Bearer realm=http://x/token, service=s')).toEqual({ scheme: 'bearer', params: { realm: 'http://x/token', service: 's' } });
  });
});

describe('credentials from the environment', () => {
  it('both or neither', () => {
    expect(credentialsFromEnv({})).toBeUndefined();
    expect(credentialsFromEnv({ REGISTRY_USER: 'u', REGISTRY_PASSWORD: 'p' })).toEqual({ username: 'u', password: 'p' });
    expect(() => credentialsFromEnv({ REGISTRY_USER: 'u' })).toThrow(/^REGISTRY_PASSWORD: set both/);
    expect(() => credentialsFromEnv({ REGISTRY_PASSWORD: 'p' })).toThrow(/^REGISTRY_USER: set both/);
  });
});
