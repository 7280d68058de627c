# Mask R-CNN + FPN with a CAFormer-S18 backbone (official ImageNet-1K weight), 1x schedule on
# COCO: the recipe of configs/_base_/mask-rcnn_metaformer_fpn_1x_coco.py.
_base_ = './coco/mask-rcnn_caformer-s18_fpn_1x_coco.py'
