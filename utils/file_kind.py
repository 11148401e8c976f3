"""What a file that failed to load as a checkpoint is, from its first bytes: an image, a web page saved instead of
the download, an empty file, a Git LFS pointer, a NumPy archive, text; or a damaged checkpoint.

    >>> describe(b'\\x89PNG\\r\\n\\x1a\\n...', '')
    'is a PNG image, not a checkpoint: pass the .pth or .safetensors file of a model.'
    >>> describe(b'PK\\x03\\x04', 'archive/data.pkl') is None   # a PyTorch zip, if only a truncated one
    True
"""
import re
from typing import Optional

HEAD_BYTES = 4096
PASS_A_MODEL = 'pass the .pth or .safetensors file of a model'
IMAGES = ((b'\x89PNG\r\n\x1a\n', 'a PNG image'), (b'\xff\xd8\xff', 'a JPEG image'), (b'GIF8', 'a GIF image'),
          (b'BM', 'a BMP image'))
# the entries torch.save writes into its zip, all under one top folder: data.pkl, byteorder, version, data/0 ...
_TORCH_ENTRY = re.compile(r'^[^/]+/(data\.pkl|byteorder|version|\.data/.*|data/\d+)$')


def first_zip_entry(head: bytes) -> str:
    """The name of a zip's first member, from its local header (a truncated zip has no central directory)."""
    if not head.startswith(b'PK\x03\x04') or len(head) < 30:
        return ''
    n = int.from_bytes(head[26:28], 'little')
    return head[30:30 + n].decode('utf-8', 'replace')


def _text(head: bytes) -> Optional[str]:
    """head as text, or None for binary data (a NUL byte, or bytes that are not UTF-8)."""
    if b'\x00' in head:
        return None
    try:
        return head.decode('utf-8')
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:   # not just a character cut in two at the end of the head
            return None
        return head[:e.start].decode('utf-8')


def describe(head: bytes, zip_entry: str) -> Optional[str]:
    """The rest of the sentence '<path> ...' for a file that is no checkpoint, from its first bytes (and the name of
    its first zip member); None when it begins like one (a pickle, a PyTorch zip, a safetensors header)."""
    if not head:
        return 'is empty (0 bytes): an interrupted download or copy. Download or export it again.'
    for magic, what in IMAGES:
        if head.startswith(magic):
            return f'is {what}, not a checkpoint: {PASS_A_MODEL}.'
    if head.startswith(b'PK\x03\x04'):
        if _TORCH_ENTRY.match(zip_entry):
            return None
        if zip_entry.endswith('.npy'):
            return f'is a NumPy .npz archive (arrays such as sampled images), not a checkpoint: {PASS_A_MODEL}.'
        return f'is a ZIP archive but not a PyTorch checkpoint (its first entry is {zip_entry!r}): {PASS_A_MODEL}.'
    if head.startswith(b'\x80'):   # a pickle (protocol 2 or later): a legacy torch.save file
        return None
    if len(head) > 8 and head[8:9] == b'{':   # safetensors: the header's length, then its JSON
        return None
    text = _text(head)
    if text is None:
        return f'is not a checkpoint (its first bytes match neither PyTorch nor safetensors): {PASS_A_MODEL}.'
    start = text.lstrip('\ufeff \t\r\n').lower()
    if start.startswith(('<!doctype html', '<html')) or '<html' in start[:1024]:
        return ('is an HTML page, not a checkpoint: a web page (a login, error or file-view page) was saved '
                'instead of the file. Download the file itself (on the Hugging Face hub: the .../resolve/main/NAME '
                'link, not .../blob/main/NAME).')
    if start.startswith('version https://git-lfs'):
        return ('is a Git LFS pointer, not the file it points to: run `git lfs pull` in its repository, or '
                'download the file itself.')
    first = text.strip().splitlines()[0][:60] if text.strip() else ''
    return f'is a text file (it begins {first!r}), not a checkpoint: {PASS_A_MODEL}.'


def not_a_checkpoint(path: str) -> Optional[str]:
    """describe() of the file at `path`; None when it begins like a checkpoint or cannot be opened."""
    try:
        with open(path, 'rb') as f:
            head = f.read(HEAD_BYTES)
    except OSError:
        return None
    return describe(head, first_zip_entry(head))
