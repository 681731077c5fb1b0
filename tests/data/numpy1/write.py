"""Writes the golden pickles here as the reference's writer did (pickle protocol 4 of a
`__main__.QuantizedWeight8bit` dataclass and of an fp32 array, NumPy 1.26, ml_dtypes), with the
expected values as .npy files. Run with NumPy 1.26.4 and ml_dtypes 0.4.1:
`python -m venv v && v/bin/pip install numpy==1.26.4 ml_dtypes==0.4.1 && v/bin/python write.py`."""

import dataclasses
import pickle

import ml_dtypes
import numpy as np


@dataclasses.dataclass
class QuantizedWeight8bit:
    weight: np.ndarray
    scales: np.ndarray


rng = np.random.default_rng(0)
quantized = QuantizedWeight8bit(
    weight=rng.integers(-127, 128, (16, 8), dtype=np.int8),
    scales=rng.uniform(0.5, 1.5, (4, 8)).astype(ml_dtypes.bfloat16),
)
array = rng.standard_normal((3, 5)).astype(np.float32)
with open("tensor00000_000", "wb") as f:
    pickle.dump(quantized, f, protocol=4)
with open("tensor00001_000", "wb") as f:
    pickle.dump(array, f, protocol=4)
np.save("weight.npy", quantized.weight)
np.save("scales_bits.npy", quantized.scales.view(np.uint16))
np.save("array.npy", array)
