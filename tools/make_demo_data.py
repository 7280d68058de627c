"""Write the synthetic demo datasets (COCO, ADE20K and ImageNet layouts).

    python tools/make_demo_data.py [--out data/demo]

Datasets already written (with their completion marker) are left untouched.
"""
import argparse

from common import add_debug_arg, run_tool

from demo_data import write_all


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='data/demo', help='output root (default: data/demo)')
    add_debug_arg(parser)
    for name, path in write_all(parser.parse_args().out).items():
        print(f'{name}: {path}')


if __name__ == '__main__':
    run_tool(main)
