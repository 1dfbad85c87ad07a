"""Backbones: DeepCluster AlexNet / VGG16, timm and torchvision models, one interface."""
from dcbench.models.base import CLUSTER_TAP, LOGITS_TAP, Backbone
from dcbench.models.deepcluster import DeepClusterAlexNet, DeepClusterVGG16, alexnet_grid
from dcbench.models.external import build_timm, build_torchvision
from dcbench.models.registry import (build_backbone, default_sobel, list_archs, register_arch,
                                     register_prefix)


@register_arch("alexnet", sobel_default=True)
def _alexnet(sobel: bool = True, input_size: int = 224) -> Backbone:
    return DeepClusterAlexNet(sobel=sobel, input_size=input_size)


@register_arch("vgg16", sobel_default=True)
def _vgg16(sobel: bool = True, input_size: int = 224) -> Backbone:
    return DeepClusterVGG16(sobel=sobel, input_size=input_size)


register_prefix("timm", build_timm)
register_prefix("tv", build_torchvision)

__all__ = ["Backbone", "CLUSTER_TAP", "LOGITS_TAP", "DeepClusterAlexNet", "DeepClusterVGG16",
           "alexnet_grid", "build_backbone", "default_sobel", "list_archs", "register_arch",
           "register_prefix"]
