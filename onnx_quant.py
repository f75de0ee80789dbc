"""Static int8 quantization of an exported segmentation graph (export.py --int8), calibrated on real images, and the
measurement that goes with it: the mIoU and the speed of the fp32 and the int8 graph on a dataset config.

Static, never dynamic: dynamic quantization computes each activation's range at run time from the tensor itself,
which costs a pass over every activation and leaves convolutions in fp32 (onnxruntime quantizes only MatMul/Gemm
dynamically); measured on this project's Lite0 it ran 1.1x with 72% of pixels agreeing. Static quantization fixes
the ranges from calibration images once, and random tensors are no calibration: their activations are not those of
photos (93% of pixels agreed). So a graph is quantized only with real images: a folder of photos or a dataset config.

The graph is QDQ (QuantizeLinear/DequantizeLinear pairs around each quantized op: the format onnxruntime fuses into
int8 kernels and that other runtimes read), weights int8 per output channel, activations uint8 per tensor, ranges
by MinMax over the calibration images. Only the backbones are quantized, the trained network's with its decoder and the ImageNet branch's (their
convolutions, activations, residual sums and padding, so that int8 tensors flow from one convolution to the next
without a dequantize between): the label similarity, the ImageNet branch's classifier and ensemble, the upsampling
and the softmax stay fp32, where 8 bits would move decisions between close labels.

Needs onnxruntime (requirements-dev.txt), imported only here and only when quantizing or measuring.
"""
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from errors import ConfigError

QUANTIZED_OPS = ("Conv", "Clip", "Relu", "Add", "Pad")  # a convolution, its ReLU6, residual sums, TF padding: int8
# node names (the exporter's) of the trained network's backbone and decoder, and of the frozen ImageNet branch's own
# EfficientNet (its stem, blocks and 1280-wide head conv: the branch runs a second backbone on the image)
QUANTIZED_PARTS = ("/model/backbone/", "/model/decoder/", "/net/stem/", "/net/blocks.", "/head/")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def import_onnxruntime():
    """onnxruntime and its quantization package, or a ConfigError saying how to install them."""
    try:
        import onnxruntime
        import onnxruntime.quantization as quantization
    except ImportError:
        raise ConfigError("export.py --int8 needs the `onnxruntime` package: pip install onnxruntime (or pip install "
                          "-r requirements-dev.txt)") from None
    return onnxruntime, quantization


def calibration_images(source, base_size, limit, data_root=""):
    """Up to `limit` calibration images (1, 3, h, w) float32 numpy, normalised as the graph's input
    (transforms.eval_image) and resized so the shorter side is base_size (as evaluate.py resizes them; 0 = as they
    are): from `source`, a folder of photos or a dataset config (evaluate.py's --dataset: a name or a YAML), spread
    evenly over it. Raises ConfigError naming `source` when it holds no image."""
    from inference import resize_short_side
    if not source:
        raise ConfigError("--int8 needs real calibration images: --calibration=FOLDER (photos) or "
                          "--calibration=DATASET (a dataset config, e.g. camvid-segnet); random tensors are no "
                          "calibration (their activations are not a photo's)")
    path = Path(source)
    if path.is_dir():
        from images import decode_rgb, open_image
        from transforms import eval_image
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ConfigError(f"--calibration={source}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
        load = lambda i: eval_image(decode_rgb(open_image(files[i]), files[i]))  # noqa: E731  (3, H, W)
        n = len(files)
    else:
        from dataset_yaml import load_dataset_config
        from evaluation import EvalDataset
        cfg, spec = load_dataset_config(source, data_root=data_root or "data")
        dataset = EvalDataset(cfg, spec)
        load = lambda i: dataset[i][0]                                     # noqa: E731  (3, H, W)
        n = len(dataset)
    picks = np.linspace(0, n - 1, min(limit, n)).round().astype(int)
    out = []
    for i in dict.fromkeys(picks.tolist()):
        x = load(i)[None]                                                  # (1, 3, H, W)
        out.append((resize_short_side(x, base_size) if base_size else x).numpy().astype(np.float32))
    return out


def quantize(fp32_path, int8_path, images):
    """Write the static int8 (QDQ) quantization of the ONNX graph at fp32_path to int8_path, its activation ranges
    calibrated on `images` (calibration_images). The fp32 graph is first shape-inferred and optimised as
    onnxruntime's quantizer asks (quant_pre_process); its metadata is carried over, plus `quantization`."""
    _, q = import_onnxruntime()
    import onnx
    prepared = Path(int8_path).with_suffix(".prepared.onnx")
    q.quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.left = iter(images)

        def get_next(self):
            x = next(self.left, None)
            return None if x is None else {"image": x}
    nodes = [n.name for n in onnx.load(str(prepared), load_external_data=False).graph.node
             if n.op_type in QUANTIZED_OPS and n.name.startswith(QUANTIZED_PARTS)]
    try:
        q.quantize_static(str(prepared), str(int8_path), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                          activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                          op_types_to_quantize=QUANTIZED_OPS, nodes_to_quantize=nodes, calibrate_method=q.CalibrationMethod.MinMax)
    finally:
        prepared.unlink(missing_ok=True)
    graph, source = onnx.load(str(int8_path)), onnx.load(str(fp32_path), load_external_data=False)
    have = {p.key for p in graph.metadata_props}
    for p in source.metadata_props:
        if p.key not in have:
            graph.metadata_props.add(key=p.key, value=p.value)
    graph.metadata_props.add(key="quantization", value=f"static int8 QDQ, per-channel int8 weights, uint8 "
                                                       f"activations, {len(nodes)} nodes ({', '.join(QUANTIZED_OPS)} of the backbones and decoder), MinMax over "
                                                       f"{len(images)} calibration images")
    onnx.save(graph, str(int8_path))


def session(path, threads):
    ort, _ = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def measure(graphs, dataset, base_size, threads, max_images=0, data_root=""):
    """mIoU and images/s of each graph {name: path} on a dataset config (evaluate.py's whole-image protocol at
    base_size, 0 = the images' own; ids resized to
    the label's size by nearest neighbour where they differ), the graphs taking turns image by image so that load changes hit all alike.
    Returns {name: {"miou", "images_per_s"}} and the images' count. images/s counts the graph's run alone."""
    from dataset_yaml import load_dataset_config
    from evaluation import EvalDataset, confusion_matrix, metrics_from_confusion
    from inference import resize_short_side
    cfg, spec = load_dataset_config(dataset, data_root=data_root or "data")
    data = EvalDataset(cfg, spec, max_images)
    n = len(data.keys)
    sessions = {name: session(path, threads) for name, path in graphs.items()}
    conf = {name: torch.zeros(n, n, dtype=torch.int64) for name in graphs}
    seconds = dict.fromkeys(graphs, 0.0)
    for i in range(len(data)):
        image, target, _ = data[i]
        x = resize_short_side(image[None], base_size) if base_size else image[None]  # (1, 3, h, w), as evaluate.py
        x = x.numpy()
        order = list(sessions) if i % 2 == 0 else list(sessions)[::-1]
        for name in order:
            start = time.perf_counter()
            ids, _ = sessions[name].run(None, {"image": x})              # (1, h, w)
            seconds[name] += time.perf_counter() - start
            pred = F.interpolate(torch.from_numpy(ids)[None].float(), size=target.shape, mode="nearest")[0, 0].long()
            conf[name] += confusion_matrix(pred, target, n)
    return {name: {"miou": metrics_from_confusion(conf[name])["miou"], "images_per_s": len(data) / seconds[name]}
            for name in graphs}, len(data)
