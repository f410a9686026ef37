import sys

try:
    from .device_build import main
except ModuleNotFoundError as exc:  # the device's Python lacks one of the three packages the build needs
    sys.exit(f"deploycompress_device needs numpy, onnx and tensorrt; {exc.name!r} is missing here: "
             f"pip install {exc.name} (TensorRT on Jetson: JetPack's python3-libnvinfer)")

sys.exit(main())
