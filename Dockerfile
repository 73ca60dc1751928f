# ddk2docker as a container for CI: the builtin engine needs no root, no devices and no tools, so
# the tool runs as an unprivileged user (the host engine's tools are deliberately not included).
#
# Built from a checkout where `npm install` has run (./scripts/install): the build copies that
# node_modules, compiles src/ with its TypeScript and keeps only the production dependencies, so
# it needs no network (`docker build --network none -t ddk2docker .`), only the base image.
FROM node:20-bookworm-slim AS build
# package.json, package-lock.json, tsconfig.json, node_modules and src: see .dockerignore.
COPY . /opt/ddk2docker/
RUN cd /opt/ddk2docker \
 && node node_modules/typescript/bin/tsc -p tsconfig.json \
 && npm prune --omit=dev --offline --no-audit --no-fund \
 && rm -rf src tsconfig.json package-lock.json

FROM node:20-bookworm-slim
COPY --from=build /opt/ddk2docker /opt/ddk2docker
USER 65534:65534
# nobody's home (/nonexistent) does not exist: cache and data directories go under /tmp.
ENV HOME=/tmp
# No CMD: without arguments the CLI prints its usage.
# The flag of dist/cli.js's #! line, which `node FILE` does not read.
ENTRYPOINT ["node", "--max-semi-space-size=4", "/opt/ddk2docker/dist/cli.js"]
