"""Train a two-layer decoder with plain NumPy SGD: tconv's forward/backward API end to end.

The data: 8x8 images made by a fixed random "teacher" decoder from 16-channel
2x2 codes. The student has the same architecture and learns from scratch.
"""

import numpy as np

import tconv

rng = np.random.default_rng(0)
teacher = [tconv.ConvTranspose2d(16, 8, 4, stride=2, padding=1, rng=1),
           tconv.ConvTranspose2d(8, 1, 4, stride=2, padding=1, rng=2)]
student = [tconv.ConvTranspose2d(16, 8, 4, stride=2, padding=1, rng=3),
           tconv.ConvTranspose2d(8, 1, 4, stride=2, padding=1, rng=4)]


def decode(layers, z):
    hidden = np.maximum(layers[0](z), 0)            # 16x2x2 -> 8x4x4, ReLU
    return hidden, layers[1](hidden)                 # 8x4x4 -> 1x8x8


lr = 0.3
for step in range(301):
    z = rng.standard_normal((32, 16, 2, 2)).astype(np.float32)
    target = decode(teacher, z)[1]
    hidden, image = decode(student, z)
    loss = float(np.mean((image - target) ** 2))
    grad = 2 * (image - target) / image.size         # d loss / d image
    grad_hidden = student[1].backward(grad) * (hidden > 0)
    student[0].backward(grad_hidden)
    for layer in student:                            # plain SGD
        layer.weight -= lr * layer.weight_grad
        layer.bias -= lr * layer.bias_grad
    if step % 50 == 0:
        print(f"step {step:3d}  loss {loss:.5f}")
