"""Every relative link of the README and of docs/ leads to a file of the repository, and every
``#anchor`` to a heading of its page, as GitHub renders them."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r'^```.*?^```', re.S | re.M)
LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')
HEADING = re.compile(r'^#{1,6}\s+(.+?)\s*#*$', re.M)


def pages():
    """The README and the pages of docs/ (not the scratch folders starting with ``_``)."""
    docs = sorted(p for p in (ROOT / 'docs').rglob('*.md')
                  if not any(part.startswith('_') for part in p.relative_to(ROOT).parts))
    return [ROOT / 'README.md'] + docs


def prose(page):
    """The page's text outside fenced code blocks."""
    return FENCE.sub('', page.read_text())


def anchors(page):
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces
    as hyphens, a repeated one numbered."""
    seen, found = {}, set()
    for title in HEADING.findall(prose(page)):
        text = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', title)  # a link keeps its text
        slug = re.sub(r'[^\w\- ]', '', text.lower()).replace(' ', '-')
        found.add(f'{slug}-{seen[slug]}' if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def test_github_anchors():
    """The anchor rule, on headings whose GitHub anchors are known."""
    page = ROOT / 'README.md'
    assert {'what-it-is', 'a-metaformer-backbone-in-your-own-mmdet-or-mmseg-config',
            'inherit-this-projects-configs', 'pretrain-on-imagenet-then-fine-tune'} <= \
        anchors(page)


@pytest.mark.parametrize('page', pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(prose(page)):
        if re.match(r'[a-z][a-z0-9+.-]*:', target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition('#')
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f'{target}: no such file')
        elif anchor and file.suffix == '.md' and anchor not in anchors(file):
            broken.append(f'{target}: no heading with that anchor in {file.name}')
    assert not broken, f'{page.relative_to(ROOT)}: ' + '; '.join(broken)
