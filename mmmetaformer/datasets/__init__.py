"""Demo-data writers and dataset presence checks."""
from .checks import check_dataset
from .demo_data import (ADE20K_LABELS, COCO_CLASSES, IMAGENET_CLASSES, IMAGENET_WNIDS,
                        write_ade20k_demo, write_all, write_coco_demo, write_imagenet_demo)

__all__ = ['check_dataset', 'write_coco_demo', 'write_ade20k_demo', 'write_imagenet_demo',
           'write_all', 'COCO_CLASSES', 'ADE20K_LABELS', 'IMAGENET_CLASSES', 'IMAGENET_WNIDS']
