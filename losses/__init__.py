"""Loss functions and learnable loss weighting."""

from losses.charbonnier import CharbonnierLoss
from losses.gradient import LaplacianGradientLoss
from losses.msssim import MSSSIMLoss, ms_ssim_adaptive
from losses.perceptual import VGGPerceptualLoss, default_vgg16_weights_path
from losses.phaseformer_loss import PhaseformerLoss
from losses.weighted import WeightedLoss, loss_weight_parameters, optimizer_param_groups

__all__ = [
    "CharbonnierLoss",
    "LaplacianGradientLoss",
    "MSSSIMLoss",
    "ms_ssim_adaptive",
    "VGGPerceptualLoss",
    "default_vgg16_weights_path",
    "PhaseformerLoss",
    "WeightedLoss",
    "loss_weight_parameters",
    "optimizer_param_groups",
]
