# ddk2docker as a container for CI: the builtin engine needs no root, no devices and no tools, so
# the tool runs as an unprivileged user. (Building this image needs a node base image from a
# registry; the host engine's tools are deliberately not included.)
FROM node:20-bookworm-slim AS build
WORKDIR /app
COPY package.json package-lock.json tsconfig.json ./
COPY src ./src
RUN npm install --no-audit --no-fund && npm prune --omit=dev

FROM node:20-bookworm-slim
WORKDIR /app
COPY --from=build /app/package.json ./
COPY --from=build /app/node_modules ./node_modules
COPY --from=build /app/dist ./dist
USER 65534:65534
ENV HOME=/tmp
ENTRYPOINT ["node", "/app/dist/cli.js"]
CMD ["--help"]
