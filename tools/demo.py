"""The README demo (``make demo``), on the CPU in a few minutes:

1. write the demo datasets (COCO, ADE20K and ImageNet layouts) under ``data/demo``;
2. train ``configs/demo/caformer_s18_maskrcnn_demo.py`` (``configs/caformer_s18_maskrcnn.py``
   on the demo COCO set, from scratch) with tools/train.py;
3. evaluate the checkpoint with tools/test.py (pycocotools bbox and segm mAP);
4. draw its predictions on the busiest validation image with tools/infer.py.

    python tools/demo.py [--work-dir work_dirs/demo]
"""
import argparse
import collections
import glob
import json
import os
import os.path as osp
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = 'configs/demo/caformer_s18_maskrcnn_demo.py'
DATA_ROOT = 'data/demo'


def run(step, *args):
    """Run ``python tools/<script> args`` from the repository root, echoing the command."""
    print(f'\n[demo] {step}\n[demo] $ python {" ".join(args)}', flush=True)
    path = os.pathsep.join(filter(None, [os.getenv('PYTHONPATH'), ROOT]))
    subprocess.run([sys.executable, *args], cwd=ROOT, env=dict(os.environ, PYTHONPATH=path),
                   check=True)


def latest_log(pattern, key):
    """The records holding ``key`` in the newest mmengine json log matching ``pattern``."""
    for path in sorted(glob.glob(pattern), reverse=True):
        with open(path) as f:
            records = [r for r in map(json.loads, f) if key in r]
        if records:
            return records
    raise FileNotFoundError(f'no {key!r} in {pattern}')


def busiest_image(coco_root):
    """The first validation image among those with the most objects."""
    with open(osp.join(ROOT, coco_root, 'annotations', 'instances_val2017.json')) as f:
        coco = json.load(f)
    counts = collections.Counter(ann['image_id'] for ann in coco['annotations'])
    image = max(coco['images'], key=lambda img: counts[img['id']])
    return osp.join(coco_root, 'val2017', image['file_name'])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--work-dir', default='work_dirs/demo')
    args = parser.parse_args()
    work_dir = osp.join(ROOT, args.work_dir)
    start = time.time()

    sys.path.insert(0, ROOT)
    from mmmetaformer.datasets.demo_data import write_all
    print(f'[demo] writing the demo datasets under {DATA_ROOT}', flush=True)
    for name, path in write_all(osp.join(ROOT, DATA_ROOT)).items():
        print(f'[demo]   {name}: {osp.relpath(path, ROOT)}')

    # The end-of-training validation is left to tools/test.py below.
    run('training (loss and ETA are logged every few iterations)', 'tools/train.py', CONFIG,
        '--work-dir', args.work_dir,
        '--cfg-options', 'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None')
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        checkpoint = osp.relpath(f.read().strip(), ROOT)
    run('evaluating with pycocotools', 'tools/test.py', CONFIG, checkpoint,
        '--work-dir', args.work_dir)
    image = busiest_image(osp.join(DATA_ROOT, 'coco'))
    picture = osp.join(args.work_dir, 'predictions.png')
    run('drawing predictions', 'tools/infer.py', image, CONFIG, checkpoint, '--out', picture,
        '--score-thr', '0.4')

    losses = [r['loss'] for r in latest_log(osp.join(work_dir, '*', 'vis_data', 'scalars.json'),
                                            'loss')]
    metrics = latest_log(osp.join(work_dir, '*', '*.json'), 'coco/bbox_mAP')[-1]
    minutes, seconds = divmod(round(time.time() - start), 60)
    print(f'\n[demo] finished in {minutes}m{seconds:02d}s\n'
          f'[demo]   training loss {losses[0]:.3f} (first logged) -> {losses[-1]:.3f} (last)\n'
          f'[demo]   pycocotools bbox mAP {metrics["coco/bbox_mAP"]:.3f}, '
          f'segm mAP {metrics["coco/segm_mAP"]:.3f}\n'
          f'[demo]   checkpoint {checkpoint}\n'
          f'[demo]   predictions {picture}')


if __name__ == '__main__':
    main()
