# Type stubs of the native module (python/src/*.rs); the public API is lorafuse/__init__.py.
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

DEFAULT_STEPS: int
DEFAULT_GUIDANCE_SCALE: float
__version__: str

class LorafuseError(Exception):
    fault: str  # "user" | "file" | "program"
    code: int  # the C ABI's status code (LORAFUSE_STATUS_*)

class UserError(LorafuseError): ...
class FileError(LorafuseError): ...
class InternalError(LorafuseError): ...
class Cancelled(LorafuseError): ...

_Lora = Union[str, Tuple[str, float]]
# (width, height, RGB bytes, parameters text, seed)
_RawImage = Tuple[int, int, bytes, str, int]

class Pipeline:
    def __init__(
        self,
        path: str,
        device: Optional[str] = None,
        *,
        threads: Optional[int] = None,
        tf32: Optional[bool] = None,
        optimize: Optional[bool] = None,
        cuda_graphs: Optional[bool] = None,
        cuda_io_binding: Optional[bool] = None,
        cuda_mem_limit: Union[int, str, None] = None,
        cudnn_conv_algo: Optional[str] = None,
        cuda_conv_layout: Optional[str] = None,
        lora_mode: Optional[str] = None,
        ort_lib: Optional[str] = None,
    ) -> None: ...
    def set_loras(
        self,
        loras: Sequence[_Lora],
        *,
        strict: Optional[bool] = None,
        unet_scale: Optional[float] = None,
        text_encoder_scale: Optional[float] = None,
    ) -> str: ...
    @property
    def loras(self) -> List[Tuple[str, float]]: ...
    @property
    def lora_mode(self) -> str: ...
    def cancel(self) -> None: ...
    def generate(
        self,
        prompt: str,
        negative_prompt: Optional[str] = None,
        *,
        steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        width: Optional[int] = None,
        height: Optional[int] = None,
        seed: Optional[int] = None,
        scheduler: Optional[str] = None,
        num_images: Optional[int] = None,
        batch_size: Optional[int] = None,
        loras: Optional[Sequence[_Lora]] = None,
        lora_dir: Optional[str] = None,
        progress: Optional[Callable[[int, int], Optional[bool]]] = None,
        model_hash: Optional[str] = None,
    ) -> Tuple[List[_RawImage], bool]: ...

def merge(
    src: str,
    out: str,
    loras: Sequence[_Lora],
    *,
    strict: Optional[bool] = None,
    unet_scale: Optional[float] = None,
    text_encoder_scale: Optional[float] = None,
    dry_run: bool = False,
) -> str: ...
def inspect(path: str) -> str: ...
def onnx_runtime(ort_lib: Optional[str] = None) -> Tuple[str, str]: ...
