"""Build and check TensorRT engines on the device, from a portable bundle; needs only numpy, onnx and tensorrt.

``deploycompress`` writes a portable bundle on a machine without TensorRT (QDQ and fp16 ONNX, a build
plan, golden inputs and outputs); this package turns it into ``model.plan`` where TensorRT and the GPU
are. It never imports torch nor the rest of ``deploycompress``, so a Jetson needs only
``PYTHONPATH=<bundle>/device python -m deploycompress_device <bundle>``.

* :mod:`.checks` - pre-build checks against the ONNX-TensorRT parser's operator table and DLA rules;
* :mod:`.plan` - the build plan (JSON) and the equivalent ``trtexec``/``polygraphy`` command lines;
* :mod:`.trt` - TensorRT itself (imported lazily): build, load, run, per-layer profile;
* :mod:`.device_build` - the on-device command.
"""

__all__ = ["DeviceBuildError"]


class DeviceBuildError(RuntimeError):
    """A device build step failed; the message names the step and, for parser errors, the ONNX node."""
