"""Small torch CNNs exported to ONNX and quantized by onnxruntime's ``quantize_static`` in
QOperator format. ``"resnet"``: QLinearConv (+ fused Relu), QLinearAdd, QLinearGlobalAveragePool,
QGemm. ``"mixed"``: QLinearConv, QLinearSigmoid and QLinearMul (SiLU), QLinearAveragePool,
QLinearLeakyRelu, MaxPool, QLinearConcat, QLinearMatMul. Used by tests/frontends/test_qoperator.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["quantized_cnn"]


def _net(kind: str):
    import torch

    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = torch.nn.Conv2d(8, 8, 1)
            self.w = torch.nn.Parameter(torch.randn(16, 6) * 0.3)

        def forward(self, x):
            a = self.c1(x)
            a = a * torch.sigmoid(a)
            p = torch.nn.functional.avg_pool2d(a, 3, stride=2, padding=1)
            q = torch.nn.functional.max_pool2d(torch.nn.functional.leaky_relu(self.c2(a), 0.1), 2)
            c = torch.cat([p, q], dim=1)  # [1, 16, 6, 6]
            return c.mean(dim=(2, 3)) @ self.w

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.c3 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.fc = torch.nn.Linear(16, 10)

        def forward(self, x):
            a = torch.relu(self.c1(x))
            b = torch.relu(self.c2(a))
            d = torch.relu(self.c3(a + b))
            return self.fc(torch.nn.functional.adaptive_avg_pool2d(d, 1).flatten(1))

    torch.manual_seed(0)
    return {"resnet": Net, "mixed": Mixed}[kind]().eval()


def quantized_cnn(directory: Path, kind: str = "resnet", activations: str = "QUInt8", weights: str = "QInt8",
                  per_channel: bool = True, n_calib: int = 8, n_eval: int = 4) -> tuple[Path, list[np.ndarray]]:
    """Write ``cnn.onnx`` and its QOperator quantization ``cnn_q.onnx``; returns (path, eval inputs).

    ``activations`` / ``weights``: onnxruntime ``QuantType`` names."""
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(0)
    calib = [rng.standard_normal((1, 3, 12, 12)).astype(np.float32) for _ in range(n_calib)]
    evals = [rng.standard_normal((1, 3, 12, 12)).astype(np.float32) * 1.5 for _ in range(n_eval)]
    fp32, q = Path(directory) / "cnn.onnx", Path(directory) / "cnn_q.onnx"
    torch.onnx.export(_net(kind), (torch.from_numpy(calib[0]),), str(fp32), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter({"x": x} for x in calib)

        def get_next(self):
            return next(self._it, None)

    quantize_static(str(fp32), str(q), Reader(), quant_format=QuantFormat.QOperator, per_channel=per_channel,
                    activation_type=QuantType[activations], weight_type=QuantType[weights])
    return q, evals
