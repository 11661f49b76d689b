#!/usr/bin/env python3
"""Rebuild the packaged "unseen" text domains in ``jaxcl/data/unseen/`` from Debian packages.

Two kinds of real English text that the embedded corpus (``jaxcl/data/corpus/``: bible, jargon,
wordnet, manpages, pydoc) does not contain, for streams of domains a model has never been trained
on (the ``embedded:unseen`` data source):

* ``gnuinfo``: GNU Texinfo manuals installed under /usr/share/info (coreutils, findutils, grep,
  sed, gzip, diffutils, gettext, wget, ed, time, readline, libtasn1), one document per Info node;
  only manuals under the GNU Free Documentation License are used.
* ``perldoc``: Perl 5.36's own documentation (perldiag and the POD of the core modules in
  perl-modules-5.36), rendered to plain text by ``pod2text``, one document per file.

Sources (Debian 12 "bookworm"; most are installed on every Debian system)::

    apt-get install -y coreutils findutils grep sed gzip diffutils gettext wget ed time \
        readline-common libtasn1-doc perl perl-modules-5.36

Rebuild (from the repository root)::

    python scripts/build_unseen.py            # writes jaxcl/data/unseen/

Cleaning, chunking, deduplication and the xz / JSON writing are those of
``scripts/build_corpus.py`` (imported from it); only the extraction, the smaller split sizes and
the NOTICE are specific to this script. The build is deterministic (sources read in sorted order,
seeded split, fixed xz settings, sorted JSON keys): two runs on the same package versions give
byte-identical files. The package versions used are recorded in ``manifest.json`` and ``NOTICE``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import gzip
import hashlib
import json
import pathlib
import random
import re
import shutil
import subprocess
import sys
import textwrap

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from build_corpus import (  # noqa: E402  (scripts/ is not a package)
    CLEAN_ENV, DEDUP_MIN_CHARS, DOC_SEPARATOR, SPLITS, Domain, MissingSource, chunk_document,
    clean_text, package_files, package_version, prepare_documents, require_path, write_xz,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "jaxcl" / "data" / "unseen"

SEED = "jaxcl-unseen-v1"
HELDOUT_CHARS = 60_000         # target size of valid and of test
TRAIN_CAP_CHARS = 900_000      # keeps both domains together well under 700 KB of xz
MAX_DOC_CHARS = 10_000         # documents are cut at paragraph breaks into pieces of at most this


# --------------------------------------------------------------------------------------------
# Splitting: build_corpus.split_documents with the sizes and seed as parameters
# --------------------------------------------------------------------------------------------

def split_documents_sized(documents: list[str], domain: str, seed: str = SEED,
                          heldout_chars: int = HELDOUT_CHARS,
                          train_cap_chars: int = TRAIN_CAP_CHARS) -> dict[str, list[str]]:
    """Seeded random assignment of whole documents: valid, then test, then train (capped).

    The same procedure as ``build_corpus.split_documents`` (which reads its sizes and seed from
    module constants): valid and test each take documents until they hold ``heldout_chars``
    characters, train takes the rest up to ``train_cap_chars``; every split keeps source order.
    """
    order = list(range(len(documents)))
    random.Random(f"{seed}:{domain}").shuffle(order)
    limits = {"valid": heldout_chars, "test": heldout_chars, "train": train_cap_chars}
    chosen: dict[str, list[int]] = {split: [] for split in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    for i in order:
        split = next((s for s in ("valid", "test", "train") if sizes[s] < limits[s]), None)
        if split is None:
            break
        chosen[split].append(i)
        sizes[split] += len(documents[i])
    return {split: [documents[i] for i in sorted(chosen[split])] for split in SPLITS}


def owning_package(path: str) -> str:
    """The Debian package that installed ``path`` (``dpkg -S``), without an architecture suffix."""
    result = subprocess.run(["dpkg", "-S", path], capture_output=True, text=True, env=CLEAN_ENV)
    lines = [line for line in result.stdout.split("\n")
             if line and not line.startswith(("diversion by", "local diversion"))]
    if result.returncode != 0 or not lines:
        raise MissingSource(f"{path} belongs to no installed Debian package")
    packages = lines[-1].rpartition(": ")[0]
    if "," in packages:
        raise RuntimeError(f"{path} is shared by several packages: {packages}")
    return packages.split(":")[0]


# --------------------------------------------------------------------------------------------
# gnuinfo: GNU Texinfo manuals (/usr/share/info), one document per node
# --------------------------------------------------------------------------------------------

INFO_DIR = "/usr/share/info"

# Manuals used, with the package expected to own them and that package's license for the
# manual as its /usr/share/doc/<package>/copyright states it (or, where the copyright file does
# not mention the documentation, as the manual's own permission notice states it). Every one is
# under the GFDL with no Invariant Sections and no Cover Texts, so the whole domain is under the
# GFDL 1.3 (each allows "version 1.3 or any later version", gettext's allows 1.2 or later).
# Left out: gnupg and gpgrt (manuals under the GPL), bc (verbatim-copying permission only),
# bzip2 (bzip2 license), libffi (Expat), nettle (public domain).
INFO_MANUALS: dict[str, tuple[str, str]] = {
    "autosprintf": ("gettext", "GFDL-1.2+ or GPL-2+ (dual-licensed manual; copyright file: "
                               "'Copyright and license for gettext documentation')"),
    "coreutils": ("coreutils", "GFDL-NIV-1.3 (copyright file, Files: doc/coreutils.texi)"),
    "diffutils": ("diffutils", "GFDL-NIV-1.3 (copyright file, Files: doc/*.texi "
                               "doc/diffutils.info)"),
    "ed": ("ed", "GFDL-NIV-1.3+ (copyright file, Files: doc/ed.info doc/ed.texi)"),
    "find": ("findutils", "GFDL-NIV-1.3+ (copyright file, Files: doc/*)"),
    "find-maint": ("findutils", "GFDL-NIV-1.3+ (copyright file, Files: doc/*)"),
    "gettext": ("gettext", "GFDL-1.2+ or GPL-2+ (dual-licensed manual; copyright file: "
                           "'Copyright and license for gettext documentation')"),
    "grep": ("grep", "GFDL-1.3+, no Invariant Sections or Cover Texts (the manual's own "
                     "permission notice; the copyright file lists only the program's GPL-3+)"),
    "gzip": ("gzip", "GFDL-1.3+-no-invariant (copyright file, Files: doc/*)"),
    "libtasn1": ("libtasn1-doc", "GFDL-1.3+, no Invariant Sections or Cover Texts (copyright "
                                 "file: 'The documentation is distributed under ... FDL 1.3')"),
    "rluserman": ("readline-common", "GFDL-NIV-1.3+ (copyright file, Files: doc/*.texi "
                                     "doc/*.info)"),
    "sed": ("sed", "GFDL-NIV-1.3+ (copyright file, Files: doc/*)"),
    "time": ("time", "GFDL-1.3+, no Invariant Sections or Cover Texts (the manual's own "
                     "permission notice; the copyright file lists only the program's GPL-3+)"),
    "wget": ("wget", "GFDL (copyright file: 'the wget info page [is] distributed under the terms "
                     "of the GNU Free Documentation License'; the manual's notice: 1.3 or later, "
                     "no Invariant Sections or Cover Texts)"),
}

# Nodes that are not manual text: the Top node (title, copyright notice, menu), license texts,
# and gettext's 'Available Packages' (a 40,000-character matrix of packages x language codes).
_INFO_DROPPED_NODES = re.compile(
    r"^(Top|GNU Free Documentation License|GNU FDL|GNU GPL|GNU LGPL|GNU General Public License|"
    r"Copying|Copying This Manual|Licenses|Available Packages)$", re.I)
_INFO_INDEX_MARK = "\x00\x08[index\x00\x08]"
_INFO_COOKIE = re.compile(r"\x00\x08\[[^\x00]*\x00\x08\]")       # image / index markers
_INFO_HEADER = re.compile(r"^File: [^,]+,\s+Node: ([^,\t\n]+)")
_INFO_MENU = re.compile(r"^\* Menu:.*", re.M | re.S)
_INFO_UNDERLINE = re.compile(r"^([*=\-.])\1*$")
_INFO_FOOTNOTES = re.compile(r"^ *-{5,} Footnotes -{5,}$", re.M)
# Cross-references: '*note Node::' and '*note Label: Node.' ('(manual)' may precede Node).
_INFO_XREF_SHORT = re.compile(r"\*([Nn])ote([ \n]+)(?:\([^)\n]*\))?([^:*]{1,200}?)::")
_INFO_XREF_LABEL = re.compile(r"\*([Nn])ote([ \n]+)([^:*]{1,200}?):[ \n]+(?:\([^)\n]*\))?"
                              r"[^.,:*\t]{0,200}?([.,])")


def info_files(manual: str) -> list[pathlib.Path]:
    """The files of one manual in reading order: NAME.info.gz, then NAME.info-1.gz, -2, ..."""
    main = require_path(f"{INFO_DIR}/{manual}.info.gz", INFO_MANUALS[manual][0])
    parts = sorted(pathlib.Path(INFO_DIR).glob(f"{manual}.info-*.gz"),
                   key=lambda p: int(re.fullmatch(r".*\.info-(\d+)\.gz", p.name).group(1)))
    return [main, *parts]


@functools.cache
def info_sources() -> dict[str, str]:
    """{info file: owning package} for every file of every manual used, checked with dpkg -S."""
    sources = {}
    for manual, (package, _) in INFO_MANUALS.items():
        for path in info_files(manual):
            owner = owning_package(str(path))
            if owner != package:
                raise RuntimeError(f"{path} belongs to {owner}, expected {package}")
            sources[str(path)] = owner
    return sources


def _info_text(path: str) -> str:
    return gzip.decompress(pathlib.Path(path).read_bytes()).decode("utf-8")


def info_preamble(manual: str) -> str:
    """The manual's copyright and permission notice: its first file's text before the first node."""
    text = _info_text(str(info_files(manual)[0])).split("\x1f", 1)[0]
    text = re.sub(r"^START-INFO-DIR-ENTRY\n.*?^END-INFO-DIR-ENTRY\n", "", text, flags=re.M | re.S)
    text = re.sub(r"\AThis is \S+, produced by makeinfo version \S+ from\s+\S+\.\n", "", text)
    text = clean_text("\n".join(line for line in text.split("\n")
                                 if not line.startswith("INFO-DIR-SECTION")))
    if "Free Documentation License" not in text and "GNU FDL" not in text:
        raise RuntimeError(f"{manual}.info does not state the GNU FDL any more; check its license")
    return text


def _info_xref(match: re.Match) -> str:
    """'*Note X::' (an @xref) -> 'See X'; '(*note X::)' (a @pxref) -> '(see X'; else 'X'.

    The line break or spaces after 'note' are kept, so the text keeps its line layout.
    """
    space, label = match.group(2), match.group(3)
    if match.group(1) == "N":
        return "See" + space + label
    before = match.string[max(0, match.start() - 1):match.start()]
    return ("see" + space if before == "(" else "") + label


def clean_info_node(body: str) -> str:
    """Node text without menus, heading underlines, Info markers; cross-references as words."""
    body = _INFO_MENU.sub("", body)
    body = _INFO_COOKIE.sub("", body)
    body = _INFO_FOOTNOTES.sub("Footnotes", body)
    body = _INFO_XREF_SHORT.sub(_info_xref, body)
    body = _INFO_XREF_LABEL.sub(lambda m: _info_xref(m) + m.group(4), body)
    lines = body.split("\n")
    kept = [line for i, line in enumerate(lines)
            if not (i and lines[i - 1].strip() and _INFO_UNDERLINE.match(line)
                    and len(line) == len(lines[i - 1]))]
    return clean_text("\n".join(kept))


def _is_manual_text(name: str, body: str) -> bool:
    """False for the Top node, license texts, indices and nodes that are only a heading and menu."""
    if _INFO_DROPPED_NODES.match(name) or _INFO_INDEX_MARK in body:
        return False
    if "Version 1.3, 3 November 2008" in body or "GNU GENERAL PUBLIC LICENSE" in body:
        return False
    text = clean_info_node(body)
    paragraphs = text.split("\n\n")
    return sum(len(p) for p in paragraphs[1:]) >= 100         # more than the heading


def extract_gnuinfo() -> list[str]:
    """Every content node of every manual (manuals in name order, nodes in file order)."""
    documents = []
    for path in info_sources():
        for chunk in _info_text(path).split("\x1f\n")[1:]:
            header, _, body = chunk.partition("\n")
            match = _INFO_HEADER.match(header)
            if not match:                      # 'Tag Table:', 'Indirect:', 'Local Variables:'
                continue
            if _is_manual_text(match.group(1).strip(), body):
                documents.append(clean_info_node(body))
    return documents


# --------------------------------------------------------------------------------------------
# perldoc: Perl 5.36 documentation (perl-modules-5.36) rendered by pod2text
# --------------------------------------------------------------------------------------------

PERL_LIB = "/usr/share/perl/5.36.0/"
PERL_PACKAGE = "perl-modules-5.36"
# Files under a license other than Perl's own ("GPL-1+ or Artistic") in
# /usr/share/doc/perl/copyright: Text::Tabs and Text::Wrap (cpan/Text-Tabs, 'TEXT-TABS').
PERLDOC_EXCLUDED = ("Text/Tabs.pm", "Text/Wrap.pm")
POD2TEXT = ["pod2text", "--utf8", "--errors=none", "--nourls", "--width=78", "--indent=4"]


@functools.cache
def perldoc_files() -> list[str]:
    """.pm and .pod files of perl-modules-5.36 under /usr/share/perl/5.36.0, sorted by path."""
    require_path("/usr/bin/pod2text", "perl")
    package_version(PERL_PACKAGE)
    return [path for path in package_files(PERL_PACKAGE)
            if path.startswith(PERL_LIB) and path.endswith((".pm", ".pod"))
            and path[len(PERL_LIB):] not in PERLDOC_EXCLUDED
            and not pathlib.Path(path).is_symlink()]


def render_pod(path: str) -> str:
    """pod2text output: plain text (no colour, overstrike or termcap escapes), 78 columns.

    pod2text exits with status 1 and 'unable to format' for a file without POD: that gives ''.
    """
    result = subprocess.run([*POD2TEXT, path], capture_output=True, env=CLEAN_ENV)
    if result.returncode == 1 and not result.stdout and b"unable to format" in result.stderr:
        return ""
    if result.returncode != 0:
        raise RuntimeError(f"pod2text failed on {path}: {result.stderr.decode(errors='replace')}")
    return clean_text(result.stdout.decode("utf-8"))


def extract_perldoc() -> list[str]:
    """One document per file with POD; files without any are skipped."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        rendered = list(pool.map(render_pod, perldoc_files()))
    return [text for text in rendered if text.strip()]


# --------------------------------------------------------------------------------------------
# Domains, NOTICE and the build
# --------------------------------------------------------------------------------------------

DOMAINS = (
    Domain(
        name="gnuinfo",
        description="GNU Texinfo manuals (coreutils, findutils, grep, sed, gzip, diffutils, "
                    "gettext, wget, ed, time, readline, libtasn1): one Info node a document.",
        packages=(),                               # filled from dpkg -S of every info file
        license="GNU Free Documentation License 1.3 or later (gettext/autosprintf: GFDL 1.2+ or "
                "GPL-2+), no Invariant Sections, no Cover Texts; each manual's notice in NOTICE",
        processing="Info files of the manuals listed in scripts/build_unseen.py (INFO_MANUALS) "
                   "split at the 0x1f node separators; the 'File: ..., Node: ...' header lines, "
                   "'* Menu:' blocks, heading underlines and Info index/image markers removed; "
                   "'*note X::' cross-references written as 'X' ('See X' / '(see X)' for @xref / "
                   "@pxref); Top nodes, index nodes, license nodes (GFDL, GPL, LGPL), gettext's "
                   "'Available Packages' table and nodes that are only a heading and a menu "
                   "dropped.",
        extract=extract_gnuinfo,
    ),
    Domain(
        name="perldoc",
        description="Perl 5.36 documentation: perldiag and the POD of the core modules, as "
                    "plain text.",
        packages=(PERL_PACKAGE, "perl"),
        license="GPL-1+ or Artistic (Perl's terms; Getopt::Long and Tie::File GPL-2+ or "
                "Artistic, Pod::Html Artistic): distributed here under the Artistic License "
                "(full text in NOTICE)",
        processing="Every .pm and .pod file of perl-modules-5.36 under /usr/share/perl/5.36.0 "
                   "(Text::Tabs and Text::Wrap, under their own license, left out) rendered with "
                   "`pod2text --utf8 --errors=none --nourls --width=78 --indent=4` from the perl "
                   "package; one document per file, files without POD skipped.",
        extract=extract_perldoc,
    ),
)


def build_notice(domains: tuple[Domain, ...]) -> str:
    """NOTICE: sources with package versions, licenses, processing, and the license texts."""
    intro = (
        "Every file <domain>.<split>.txt.xz in this directory holds real text extracted from the "
        "Debian 12 (bookworm) packages named below by scripts/build_unseen.py; no text was "
        "generated or paraphrased, and none of it is in the embedded corpus (jaxcl/data/corpus). "
        "The text was normalised as in scripts/build_corpus.py (NFC, LF line ends, unicode "
        "spaces as plain spaces, tabs expanded, control characters, overstrike and trailing "
        f"spaces removed, runs of blank lines collapsed to one). A paragraph of {DEDUP_MIN_CHARS}+ "
        "characters that already occurred earlier in its domain was dropped, as was a document "
        "that lost more than half of its text that way. Documents longer than "
        f"{MAX_DOC_CHARS:,} characters were cut at paragraph breaks. Whole documents were then "
        f"assigned to valid and test (about {HELDOUT_CHARS:,} characters each) and train (capped "
        f"at {TRAIN_CAP_CHARS:,} characters) with a fixed seed. Documents are separated by two "
        "blank lines."
    )
    parts = ["jaxcl unseen text domains: sources, licenses and processing", "=" * 60, "",
             textwrap.fill(intro, width=96), ""]
    for domain in domains:
        versions = ", ".join(f"{p} {v}" for p, v in domain.versions.items())
        parts += [f"[{domain.name}] {domain.description}",
                  textwrap.fill(f"Debian packages: {versions}", width=96, initial_indent="  ",
                                subsequent_indent="    "),
                  textwrap.fill(f"License: {domain.license}", width=96, initial_indent="  ",
                                subsequent_indent="    "),
                  textwrap.fill(f"Processing: {domain.processing}", width=96,
                                initial_indent="  ", subsequent_indent="    "),
                  ""]
    parts += ["Copyright and license of each GNU manual (gnuinfo.*)", "-" * 52, ""]
    for manual, (package, license_) in INFO_MANUALS.items():
        parts += [f"== {manual}.info (Debian package {package}): {license_}",
                  "Copyright and permission notice of the manual:", "",
                  textwrap.indent(info_preamble(manual), "  "), ""]
    perl_copyright = require_path("/usr/share/doc/perl/copyright", "perl").read_text("utf-8")
    perl_holder = re.search(r"^Files: \*\nCopyright:\n (.+)$", perl_copyright, re.M).group(1)
    parts += ["Copyright of Perl's documentation (perldoc.*)", "-" * 45, "",
              perl_holder.strip(),
              "The core modules bundled with Perl carry their own copyright notices, listed in",
              "/usr/share/doc/perl/copyright; all are under Perl's terms unless named above.", "",
              "GNU Free Documentation License, version 1.3 (gnuinfo.*), from "
              "/usr/share/common-licenses/GFDL-1.3:", "",
              require_path("/usr/share/common-licenses/GFDL-1.3", "base-files")
              .read_text("utf-8").strip("\n"), "",
              "The \"Artistic License\" (perldoc.*), from /usr/share/common-licenses/Artistic:",
              "",
              require_path("/usr/share/common-licenses/Artistic", "base-files")
              .read_text("utf-8").strip("\n"), ""]
    return "\n".join(parts)


def build(out_dir: pathlib.Path) -> dict:
    """Extract, split and write both domains; return the manifest that was written.

    Everything is extracted before anything is written, so a missing source leaves the previous
    files untouched.
    """
    gnuinfo, perldoc = DOMAINS
    gnuinfo.packages = tuple(sorted(set(info_sources().values())))
    for domain in DOMAINS:
        domain.versions = {p: package_version(p) for p in domain.packages}
    prepared = {domain.name: [piece for document in prepare_documents(domain.extract())
                              for piece in chunk_document(document, MAX_DOC_CHARS)]
                for domain in DOMAINS}
    notice = build_notice(DOMAINS)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict = {
        "format": "xz-compressed UTF-8 text, documents separated by two blank lines",
        "document_separator": DOC_SEPARATOR,
        "seed": SEED,
        "stage_order": [domain.name for domain in DOMAINS],
        "domains": {},
    }
    for domain in DOMAINS:
        documents = prepared[domain.name]
        if any(DOC_SEPARATOR in d or not d.strip() for d in documents):
            raise RuntimeError(f"{domain.name}: a document is empty or holds two blank lines")
        entry = {"description": domain.description, "license": domain.license,
                 "sources": domain.versions, "documents_available": len(documents),
                 "chars_available": sum(len(d) for d in documents), "splits": {}}
        for split, docs in split_documents_sized(documents, domain.name).items():
            text = DOC_SEPARATOR.join(docs) + "\n"
            filename = f"{domain.name}.{split}.txt.xz"
            write_xz(out_dir / filename, text)
            entry["splits"][split] = {
                "file": filename, "chars": len(text), "documents": len(docs),
                "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                "compressed_bytes": (out_dir / filename).stat().st_size,
            }
            print(f"{domain.name:8s} {split:5s} {len(text):>9,} chars {len(docs):>6,} docs "
                  f"{entry['splits'][split]['compressed_bytes']:>9,} bytes xz", flush=True)
        manifest["domains"][domain.name] = entry
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n",
                                           encoding="utf-8")
    (out_dir / "NOTICE").write_text(notice, encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; exit status 2 names a missing Debian package."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                        help=f"output directory (default: {DEFAULT_OUT.relative_to(REPO_ROOT)})")
    args = parser.parse_args(argv)
    if shutil.which("dpkg-query", path=CLEAN_ENV["PATH"]) is None:
        print("error: this build reads Debian packages and needs dpkg-query (Debian/Ubuntu)",
              file=sys.stderr)
        return 2
    try:
        build(args.out)
    except MissingSource as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    total = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    print(f"wrote {args.out} ({total:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
