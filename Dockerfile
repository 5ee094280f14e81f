# onnx-chat image: the release binary plus ONNX Runtime's shared library from the PyPI wheel.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked

FROM python:3.11-slim-bookworm
RUN pip install --no-cache-dir onnxruntime==1.31.1
COPY --from=build /src/target/release/onnx-chat /usr/local/bin/onnx-chat
ENV ORT_DYLIB_PATH=/usr/local/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1 \
    HF_HOME=/hf
ENTRYPOINT ["onnx-chat"]
