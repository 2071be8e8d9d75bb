#!/usr/bin/env python3
"""A Python host for the lorafuse plugin, with ctypes only (no build step, no third-party packages).

    python3 plugin-api/examples/host.py target/debug/liblorafuse.so models/tiny/onnx \
        models/tiny/loras/diffusers.safetensors models/tiny/loras/kohya_wide.safetensors 0.6 out/

Opens the pipeline, applies the first LoRA, generates, switches to the second LoRA at the given
weight on the live pipeline, generates again, and writes out/a.png and out/b.png (with the A1111
`parameters` text chunk). Settings: prompt "a photo of a cat" (or the optional PROMPT argument),
negative "blurry", 4 steps (25 with PROMPT), guidance 7.5 (or GUIDANCE), seed 42, CPU, 1 thread. The structs mirror plugin-api/include/lorafuse.h field for
field; the table's entries must stay in the header's order.
"""
import ctypes as C
import os
import struct
import sys
import zlib

API_VERSION = 1
DEVICE_CPU = 1
STATUS_CANCELLED = 5

Status_p = C.c_void_p
Handle_p = C.c_void_p
ProgressFn = C.CFUNCTYPE(C.c_bool, C.c_void_p, C.c_uint32, C.c_uint32)
LogFn = C.CFUNCTYPE(None, C.c_void_p, C.c_uint32, C.c_char_p)


# Version-1 layouts on purpose: a host written for version 1 of the structs keeps working with a
# newer plugin (ctypes zero-fills, and init_* fills version 1 when struct_version is not 1..current).
class PipelineOptions(C.Structure):
    _fields_ = [
        ("struct_version", C.c_uint32),
        ("device", C.c_uint32),
        ("model_dir", C.c_char_p),
        ("cuda_device_id", C.c_int32),
        ("intra_threads", C.c_uint32),
        ("ort_library", C.c_char_p),
        ("tf32", C.c_bool),
    ]


class GenerateParams(C.Structure):
    _fields_ = [
        ("struct_version", C.c_uint32),
        ("width", C.c_uint32),
        ("height", C.c_uint32),
        ("steps", C.c_uint32),
        ("guidance_scale", C.c_float),
        ("num_images", C.c_uint32),
        ("batch_size", C.c_uint32),
        ("seed", C.c_uint64),
        ("prompt", C.c_char_p),
        ("negative_prompt", C.c_char_p),
        ("scheduler", C.c_char_p),
        ("progress", ProgressFn),
        ("userdata", C.c_void_p),
    ]


class MergeOptions(C.Structure):
    _fields_ = [
        ("struct_version", C.c_uint32),
        ("unet_scale", C.c_float),
        ("text_encoder_scale", C.c_float),
        ("strict", C.c_bool),
        ("dry_run", C.c_bool),
    ]


class Api(C.Structure):
    pass


Api._fields_ = [
    ("release_status", C.CFUNCTYPE(None, Status_p)),
    ("status_code", C.CFUNCTYPE(C.c_uint32, Status_p)),
    ("status_message", C.CFUNCTYPE(C.c_char_p, Status_p)),
    ("set_log_callback", C.CFUNCTYPE(Status_p, LogFn, C.c_void_p)),
    ("init_pipeline_options", C.CFUNCTYPE(Status_p, C.POINTER(PipelineOptions))),
    ("init_generate_params", C.CFUNCTYPE(Status_p, C.POINTER(GenerateParams))),
    ("init_merge_options", C.CFUNCTYPE(Status_p, C.POINTER(MergeOptions))),
    ("create_pipeline", C.CFUNCTYPE(Status_p, C.POINTER(PipelineOptions), C.POINTER(Handle_p))),
    ("release_pipeline", C.CFUNCTYPE(None, Handle_p)),
    ("load_lora", C.CFUNCTYPE(Status_p, C.c_char_p, C.POINTER(Handle_p))),
    ("release_lora", C.CFUNCTYPE(None, Handle_p)),
    ("set_loras", C.CFUNCTYPE(Status_p, Handle_p, C.POINTER(Handle_p), C.POINTER(C.c_float), C.c_size_t,
                              C.POINTER(MergeOptions))),
    ("lora_report", C.CFUNCTYPE(Status_p, Handle_p, C.POINTER(Handle_p))),
    ("generate", C.CFUNCTYPE(Status_p, Handle_p, C.POINTER(GenerateParams), C.POINTER(Handle_p))),
    ("image_count", C.CFUNCTYPE(C.c_size_t, Handle_p)),
    ("image_pixels", C.CFUNCTYPE(C.POINTER(C.c_uint8), Handle_p, C.c_size_t, C.POINTER(C.c_uint32),
                                 C.POINTER(C.c_uint32))),
    ("image_parameters", C.CFUNCTYPE(C.c_char_p, Handle_p, C.c_size_t)),
    ("image_seed", C.CFUNCTYPE(C.c_uint64, Handle_p, C.c_size_t)),
    ("release_image", C.CFUNCTYPE(None, Handle_p)),
    ("merge_export", C.CFUNCTYPE(Status_p, C.c_char_p, C.c_char_p, C.POINTER(Handle_p), C.POINTER(C.c_float),
                                 C.c_size_t, C.POINTER(MergeOptions), C.POINTER(Handle_p))),
    ("inspect", C.CFUNCTYPE(Status_p, C.c_char_p, C.POINTER(Handle_p))),
    ("lora_info", C.CFUNCTYPE(Status_p, Handle_p, C.POINTER(Handle_p))),
    ("string_data", C.CFUNCTYPE(C.c_char_p, Handle_p, C.POINTER(C.c_size_t))),
    ("release_string", C.CFUNCTYPE(None, Handle_p)),
    # ---- End of version 1 ----
]


class ApiBase(C.Structure):
    _fields_ = [
        ("get_api", C.CFUNCTYPE(C.POINTER(Api), C.c_uint32)),
        ("get_version_string", C.CFUNCTYPE(C.c_char_p)),
    ]


class LorafuseError(RuntimeError):
    def __init__(self, code, message):
        super().__init__(f"lorafuse error {code}: {message}")
        self.code = code
        self.message = message


class Plugin:
    def __init__(self, path):
        self.lib = C.CDLL(path)
        self.lib.lorafuse_get_api_base.restype = C.POINTER(ApiBase)
        self.lib.lorafuse_get_api_base.argtypes = []
        base = self.lib.lorafuse_get_api_base().contents
        self.version = base.get_version_string().decode()
        api = base.get_api(API_VERSION)
        if not api:
            raise RuntimeError(f"lorafuse plugin {self.version} lacks API v{API_VERSION}")
        self.api = api.contents

    def check(self, st):
        if st:
            code = self.api.status_code(st)
            msg = self.api.status_message(st).decode("utf-8", "replace")
            self.api.release_status(st)
            raise LorafuseError(code, msg)


def write_png(path, width, height, rgb, parameters):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + rgb[y * width * 3:(y + 1) * width * 3] for y in range(height))
    text = b"parameters\x00\x00\x00\x00\x00" + parameters.encode("utf-8")  # iTXt, uncompressed
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"iTXt", text) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)


def generate_to(plugin, pipeline, out_dir, name, prompt=None, guidance=7.5):
    api = plugin.api
    steps_seen = []
    # Keep the callback object alive for the whole call (ctypes does not).
    progress = ProgressFn(lambda _ud, step, total: steps_seen.append((step, total)) or True)
    gp = GenerateParams()
    plugin.check(api.init_generate_params(C.byref(gp)))
    gp.prompt = (prompt or "a photo of a cat").encode()
    gp.negative_prompt = b"blurry"
    gp.steps = 25 if prompt else 4
    gp.guidance_scale = guidance
    gp.seed = 42
    gp.progress = progress
    image = Handle_p()
    plugin.check(api.generate(pipeline, C.byref(gp), C.byref(image)))
    try:
        w, h = C.c_uint32(), C.c_uint32()
        px = api.image_pixels(image, 0, C.byref(w), C.byref(h))
        rgb = C.string_at(px, w.value * h.value * 3)
        params = api.image_parameters(image, 0).decode("utf-8")
        path = os.path.join(out_dir, name + ".png")
        write_png(path, w.value, h.value, rgb, params)
        print(f"{path} {w.value}x{h.value} seed {api.image_seed(image, 0)} ({len(steps_seen)} progress calls)")
    finally:
        api.release_image(image)
    if not steps_seen or steps_seen[-1][0] != steps_seen[-1][1]:
        raise RuntimeError(f"progress callback calls: {steps_seen}")


def main(argv):
    if len(argv) not in (7, 8, 9):
        print(f"usage: {argv[0]} LIBLORAFUSE MODEL_DIR LORA_A LORA_B WEIGHT_B OUT_DIR [PROMPT [GUIDANCE]]", file=sys.stderr)
        return 2
    lib, model, lora_a, lora_b, weight_b, out_dir = argv[1:7]
    prompt = argv[7] if len(argv) > 7 else None
    guidance = float(argv[8]) if len(argv) > 8 else 7.5
    os.makedirs(out_dir, exist_ok=True)
    plugin = Plugin(lib)
    api = plugin.api
    print(f"lorafuse {plugin.version}")
    log = LogFn(lambda _ud, level, msg: print(f"[lorafuse {level}] {msg.decode()}", file=sys.stderr))
    plugin.check(api.set_log_callback(log, None))

    opts = PipelineOptions()
    plugin.check(api.init_pipeline_options(C.byref(opts)))
    opts.model_dir = model.encode()
    opts.device = DEVICE_CPU
    opts.intra_threads = 1
    pipeline = Handle_p()
    plugin.check(api.create_pipeline(C.byref(opts), C.byref(pipeline)))
    try:
        a, b = Handle_p(), Handle_p()
        plugin.check(api.load_lora(lora_a.encode(), C.byref(a)))
        plugin.check(api.load_lora(lora_b.encode(), C.byref(b)))

        plugin.check(api.set_loras(pipeline, (Handle_p * 1)(a), (C.c_float * 1)(1.0), 1, None))
        generate_to(plugin, pipeline, out_dir, "a", prompt, guidance)

        # Hot swap on the live pipeline; the pipeline keeps its own reference to b.
        plugin.check(api.set_loras(pipeline, (Handle_p * 1)(b), (C.c_float * 1)(float(weight_b)), 1, None))
        api.release_lora(a)
        api.release_lora(b)
        generate_to(plugin, pipeline, out_dir, "b", prompt, guidance)

        # Errors come back as exceptions with stable codes; a NULL prompt is INVALID_ARGUMENT.
        gp = GenerateParams()
        plugin.check(api.init_generate_params(C.byref(gp)))
        image = Handle_p()
        try:
            plugin.check(api.generate(pipeline, C.byref(gp), C.byref(image)))
            raise RuntimeError("a NULL prompt was accepted")
        except LorafuseError as e:
            assert e.code == 1 and not image, (e.code, image)
            print(f"NULL prompt -> {e.code}: {e.message}")
    finally:
        api.release_pipeline(pipeline)
        api.release_pipeline(pipeline)  # a second release is ignored
    plugin.check(api.set_log_callback(LogFn(), None))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
