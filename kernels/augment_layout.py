"""The per-crop parameter row every implementation of DINO's photometric augmentation reads.

One row of `NUM_PARAMS` float32 values per crop (`PARAM_NAMES`: flip, jitter on/off, the order of the four
jitter ops, their factors, grayscale, blur and its sigma, solarisation), and the luma weights of the grayscale
and saturation ops. The batched torch reference (dinovmf/data/augment.py), the C++ op
(csrc/augment_cpu_impl.h, which repeats these numbers) and the Triton kernel (kernels/augment.py) all read
it, so they apply the same augmentation to the same crop; how the values are drawn is
`dinovmf.data.augment_params`.
"""
PARAM_NAMES = ("flip", "jitter", "op0", "op1", "op2", "op3", "brightness", "contrast", "saturation", "hue",
               "gray", "blur", "sigma", "solarize")
NUM_PARAMS = len(PARAM_NAMES)
# Column indices (csrc/augment_cpu_impl.h and kernels/augment.py use the same numbers).
(FLIP, JITTER, OP0, OP1, OP2, OP3, BRIGHTNESS, CONTRAST, SATURATION, HUE, GRAY, BLUR, SIGMA,
 SOLARIZE) = range(NUM_PARAMS)
# Jitter op ids, the values of columns op0..op3 (in the order they are applied).
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
# ITU-R BT.601 luma, the weights of PIL's convert("L") and torchvision's rgb_to_grayscale.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
