"""The README demo (``make demo``), on the CPU in a few minutes:

1. write the demo datasets (COCO, ADE20K and ImageNet layouts) under ``data/demo``;
2. train ``configs/demo/caformer_s18_maskrcnn_demo.py`` (``configs/caformer_s18_maskrcnn.py``
   on the demo COCO set, from scratch) with tools/train.py, which evaluates the last epoch
   with pycocotools (bbox and segm AP, per class);
3. draw the predictions on the busiest validation image and check them against its objects.

Only progress lines and a summary are printed; the full log is ``WORK_DIR/demo.log``.

    python tools/demo.py [--work-dir work_dirs/demo]
"""
import argparse
import collections
import contextlib
import glob
import io
import json
import os
import os.path as osp
import re
import subprocess
import sys
import time

from common import add_debug_arg, run_tool

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = 'configs/demo/caformer_s18_maskrcnn_demo.py'
DATA_ROOT = 'data/demo'
SCORE_THR = 0.5
# glibc returns freed blocks over 128 KiB to the OS, so every training iteration page-faults
# its activations back in (20% system time); keeping them made the demo's CPU training ~10%
# faster. Used unless GLIBC_TUNABLES is set; other C libraries ignore it.
KEEP_FREED_MEMORY = 'glibc.malloc.mmap_threshold=2147483647:glibc.malloc.trim_threshold=2147483647'
TRAIN_LINE = re.compile(
    r'Epoch\(train\)\s*\[(\d+)\]\[\s*(\d+)/(\d+)\].*?eta: (\S+).*?\sloss: (\S+)')
VAL_LINE = re.compile(r'Epoch\(val\)\s*\[\d+\]\[\s*(\d+)/(\d+)\]')


def say(text=''):
    print(f'[demo] {text}' if text else '', flush=True)


def train(work_dir, log_path, *cfg_options):
    """Run tools/train.py with its output in ``log_path``; print its progress lines."""
    command = [sys.executable, 'tools/train.py', CONFIG, '--work-dir', work_dir,
               '--cfg-options', *cfg_options]
    say(f'$ python {" ".join(command[1:])}   (log: {osp.relpath(log_path, ROOT)})')
    path = os.pathsep.join(filter(None, [ROOT, os.getenv('PYTHONPATH')]))
    env = dict(os.environ, PYTHONPATH=path)
    env.setdefault('GLIBC_TUNABLES', KEEP_FREED_MEMORY)
    shown = None
    with open(log_path, 'w') as log, subprocess.Popen(
            command, cwd=ROOT, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        for line in proc.stdout:
            log.write(line)
            match = TRAIN_LINE.search(line)
            if match:
                epoch, it, iters, eta, loss = match.groups()
                say(f'train epoch {epoch} iter {int(it):>3}/{iters}  loss {float(loss):.3f}  '
                    f'eta {eta}')
            elif VAL_LINE.search(line) and VAL_LINE.search(line).groups() != shown:
                shown = VAL_LINE.search(line).groups()
                say('evaluating iter {}/{}'.format(*shown))
            elif line.startswith('error:'):
                say(line.strip())
    if proc.returncode:
        with open(log_path) as f:
            tail = f.readlines()[-15:]
        raise SystemExit(''.join(tail) + f'error: training failed (exit status '
                         f'{proc.returncode}); the full log is {log_path}')


def training_losses(work_dir):
    """The logged training losses of the newest run in ``work_dir`` (mmengine scalars)."""
    runs = sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')))
    with open(runs[-1]) as f:
        return [r['loss'] for r in map(json.loads, f) if 'loss' in r]


def per_class_ap(ann_file, results_prefix):
    """COCO AP@[.5:.95] per class and over all classes, for boxes and masks, from the result
    files the evaluation wrote (``<prefix>.bbox.json`` / ``.segm.json``), with pycocotools."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    table = {}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO(ann_file)
        for iou_type in ('bbox', 'segm'):
            evaluation = COCOeval(gt, gt.loadRes(f'{results_prefix}.{iou_type}.json'), iou_type)
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
            precision = evaluation.eval['precision'][:, :, :, 0, -1]  # IoU, recall, class
            for k, cat in enumerate(evaluation.params.catIds):
                p = precision[:, :, k]
                table[gt.cats[cat]['name'], iou_type] = p[p > -1].mean()
            table['all (mAP)', iou_type] = evaluation.stats[0]
    return table


def class_table(table):
    """Lines of a per-class bbox / segm AP table."""
    names = list(dict.fromkeys(name for name, _ in table))
    return [f'{"class":<10} {"bbox AP":>8} {"segm AP":>8}'] + [
        f'{name:<10} {table[name, "bbox"]:>8.3f} {table[name, "segm"]:>8.3f}' for name in names]


def busiest_image(ann_file):
    """The first validation image among those with the most objects, with its objects
    as (class index, [x1, y1, x2, y2])."""
    with open(ann_file) as f:
        coco = json.load(f)
    objects = collections.defaultdict(list)
    for ann in coco['annotations']:
        x, y, w, h = ann['bbox']
        objects[ann['image_id']].append((ann['category_id'] - 1, [x, y, x + w, y + h]))
    image = max(coco['images'], key=lambda img: len(objects[img['id']]))
    return image['file_name'], objects[image['id']]


def found_objects(pred, objects, score_thr, iou_thr=0.5):
    """How many of ``objects`` a detection scoring ``score_thr`` covers with IoU >=
    ``iou_thr`` and the right class."""
    import torch
    from mmdet.structures.bbox import bbox_overlaps
    keep = pred.scores >= score_thr
    boxes, labels = pred.bboxes[keep], pred.labels[keep]
    gt = torch.tensor([box for _, box in objects], dtype=torch.float32)
    ious = bbox_overlaps(gt, boxes) if len(boxes) else torch.zeros(len(gt), 0)
    return sum(bool(((ious[i] >= iou_thr) & (labels == label)).any())
               for i, (label, _) in enumerate(objects)), int(keep.sum())


def draw_busiest_image(checkpoint, ann_file, image_dir, picture):
    """Draw the predictions of the demo model in ``checkpoint`` on the validation image with
    the most objects into ``picture``, quietly; returns the image's path, its objects, how many
    of them a box scoring :data:`SCORE_THR` found and how many boxes were drawn."""
    from infer import draw_detections, init_predictor
    file_name, objects = busiest_image(ann_file)
    image = osp.join(image_dir, file_name)
    with contextlib.redirect_stdout(io.StringIO()):  # mmengine prints "Loads checkpoint ..."
        model = init_predictor(osp.join(ROOT, CONFIG), checkpoint, 'cpu')
    pred = draw_detections(model, osp.join(ROOT, image), picture, SCORE_THR)
    return (image, objects, *found_objects(pred, objects, SCORE_THR))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--work-dir', default='work_dirs/demo')
    add_debug_arg(parser)
    args = parser.parse_args()
    work_dir = osp.join(ROOT, args.work_dir)
    os.makedirs(work_dir, exist_ok=True)
    start = time.time()

    from demo_data import write_all
    say(f'writing the demo datasets under {DATA_ROOT}')
    for name, path in write_all(osp.join(ROOT, DATA_ROOT)).items():
        say(f'  {name}: {osp.relpath(path, ROOT)}')

    say('training Mask R-CNN (CAFormer-S18, from scratch) on the demo COCO set, then '
        'evaluating it with pycocotools')
    results = osp.join(work_dir, 'results')
    train(args.work_dir, osp.join(work_dir, 'demo.log'),
          f'val_evaluator.outfile_prefix={results}')
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        checkpoint = osp.relpath(f.read().strip(), ROOT)
    losses = training_losses(work_dir)
    coco = osp.join(DATA_ROOT, 'coco')
    ann_file = osp.join(ROOT, coco, 'annotations', 'instances_val2017.json')
    table = per_class_ap(ann_file, results)

    say('drawing the predictions on the validation image with the most objects')
    picture = osp.join(args.work_dir, 'predictions.png')
    image, objects, found, drawn = draw_busiest_image(
        osp.join(ROOT, checkpoint), ann_file, osp.join(coco, 'val2017'), osp.join(ROOT, picture))

    minutes, seconds = divmod(round(time.time() - start), 60)
    say()
    say(f'finished in {minutes}m{seconds:02d}s')
    say(f'  training loss {losses[0]:.3f} (first logged) -> {losses[-1]:.3f} (last)')
    say('  pycocotools AP@[.5:.95] on the validation images:')
    for line in class_table(table):
        say(f'    {line}')
    say(f'  {picture}: {image}, {drawn} boxes scoring >= {SCORE_THR}; {found} of its '
        f'{len(objects)} objects found with the right class (IoU >= 0.5)')
    say(f'  checkpoint {checkpoint}')
    say(f'  full log {osp.join(args.work_dir, "demo.log")}')


if __name__ == '__main__':
    run_tool(main)
