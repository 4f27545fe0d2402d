"""The source allowlist (``core/_sources.py``): parsed matching, bypass shapes refused."""

from __future__ import annotations

import ntpath
import re
import string
import unicodedata
from urllib.parse import unquote, urlsplit

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import companion_runtime as cr
from tests.support.core import ALLOWLIST, THOROUGH, SneakyStr, garbage

pytestmark = pytest.mark.unit

OK = "ok"
MALFORMED = "malformed_spec"
SCHEME = "scheme_not_allowed"
NOT_ALLOWED = "source_not_allowed"

CASES = [
    # Plain matches, and what parsing (not prefixing) means for them.
    ("https://models.example.com/tiny.gguf", OK),
    ("https://models.example.com/a/b/c.gguf", OK),
    ("https://models.example.com", OK),
    ("https://models.example.com?download=1", OK),
    ("https://models.example.com/tiny.gguf?download=1&x=%41", OK),
    ("https://MODELS.Example.COM/tiny.gguf", OK),
    ("HTTPS://models.example.com/tiny.gguf", OK),
    ("hTtPs://models.example.com/tiny.gguf", OK),
    ("https://models.example.com:443/tiny.gguf", OK),
    ("https://models.example.com:0443/tiny.gguf", OK),
    ("https://cdn.example.org/models/tiny.gguf", OK),
    ("https://cdn.example.org/models/", OK),
    ("https://cdn.example.org/models/sub/dir/x", OK),
    # Look-alike hosts and paths outside the entry.
    ("https://models.example.com.evil.net/tiny.gguf", NOT_ALLOWED),
    ("https://evil.net/models.example.com/tiny.gguf", NOT_ALLOWED),
    ("https://evilmodels.example.com/tiny.gguf", NOT_ALLOWED),
    ("https://example.com/tiny.gguf", NOT_ALLOWED),
    ("https://cdn.example.org/models-evil/tiny.gguf", NOT_ALLOWED),
    ("https://cdn.example.org/modelsx", NOT_ALLOWED),
    ("https://cdn.example.org/models", NOT_ALLOWED),
    ("https://cdn.example.org/Models/tiny.gguf", NOT_ALLOWED),
    ("https://cdn.example.org/", NOT_ALLOWED),
    ("https://models.example.com:8443/tiny.gguf", NOT_ALLOWED),
    ("https://models.example.com:444/tiny.gguf", NOT_ALLOWED),
    ("https://models.example.com:80/tiny.gguf", NOT_ALLOWED),
    ("https://127.0.0.1/tiny.gguf", NOT_ALLOWED),
    # DNS limits: a label of 63 characters and a name of 253 are hosts (just not allowed
    # ones); one character more is no host at all.
    (f"https://{'a' * 63}.example.com/x", NOT_ALLOWED),
    (f"https://{'a' * 64}.example.com/x", MALFORMED),
    (f"https://{'.'.join(['a' * 63] * 3 + ['b' * 61])}/x", NOT_ALLOWED),
    (f"https://{'.'.join(['a' * 63] * 3 + ['b' * 62])}/x", MALFORMED),
    # Other schemes.
    ("http://models.example.com/tiny.gguf", SCHEME),
    ("HTTP://models.example.com/tiny.gguf", SCHEME),
    ("ftp://models.example.com/tiny.gguf", SCHEME),
    ("file:///etc/passwd", SCHEME),
    ("javascript:alert(1)", SCHEME),
    ("data:text/plain,hello", SCHEME),
    ("httpss://models.example.com/", SCHEME),
    ("ws://models.example.com/", SCHEME),
    # Userinfo.
    ("https://models.example.com@evil.net/tiny.gguf", MALFORMED),
    ("https://user@models.example.com/tiny.gguf", MALFORMED),
    ("https://user:pass@models.example.com/tiny.gguf", MALFORMED),
    ("https://:@models.example.com/tiny.gguf", MALFORMED),
    ("https://evil.net%40models.example.com/", MALFORMED),
    # Backslashes, whitespace and controls, anywhere.
    ("https://models.example.com\\@evil.net/", MALFORMED),
    ("https://models.example.com/a\\..\\b", MALFORMED),
    ("https:\\\\models.example.com\\x", MALFORMED),
    ("https://models.example.com/a b", MALFORMED),
    (" https://models.example.com/x", MALFORMED),
    ("https://models.example.com/x ", MALFORMED),
    ("https://models.example.com/x\n", MALFORMED),
    ("https://models.exa\tmple.com/x", MALFORMED),
    ("https://models.example.com/x\r\nHost: evil", MALFORMED),
    ("https://models.example.com/x\x00.gguf", MALFORMED),
    ("https://models.example.com/x\x7f", MALFORMED),
    ("\x00https://models.example.com/x", MALFORMED),
    # Non-ASCII, including homoglyph hosts and dots that IDNA folds into '.'.
    ("https://mоdels.example.com/x", MALFORMED),
    ("https://models.example.com\u3002evil.net/", MALFORMED),
    ("https://models\uff0eexample.com/x", MALFORMED),
    ("https://models.example.com/caf\u00e9.gguf", MALFORMED),
    ("https://ｍodels.example.com/x", MALFORMED),
    # Percent-encoded dots, slashes, backslashes; broken or double encodings.
    ("https://models.example.com/%2e%2e/secret", MALFORMED),
    ("https://models.example.com/%2E%2E/secret", MALFORMED),
    ("https://cdn.example.org/models%2f..%2fsecret", MALFORMED),
    ("https://cdn.example.org/models/%2F", MALFORMED),
    ("https://cdn.example.org/models/%5c", MALFORMED),
    ("https://cdn.example.org/models/%5C", MALFORMED),
    ("https://models.example.com/x?next=%2e", MALFORMED),
    ("https://models.example.com/%252e%252e/x", MALFORMED),
    ("https://models.example.com/x%00.gguf", MALFORMED),
    ("https://models.example.com/x%0a", MALFORMED),
    ("https://models.example.com/x%7F", MALFORMED),
    ("https://models.example.com/x%", MALFORMED),
    ("https://models.example.com/x%4", MALFORMED),
    ("https://models.example.com/x%zz", MALFORMED),
    # Percent-encoded bytes of the path that are no UTF-8: an overlong "." or "/" (%c0%ae,
    # %c0%af, %e0%80%ae), which servers that decode UTF-8 loosely (Tomcat's CVE-2008-2938, IIS)
    # read as "..", or a lone byte. UTF-8 is fine, and a query may carry any byte.
    ("https://cdn.example.org/models/%c0%ae%c0%ae/secret", MALFORMED),
    ("https://cdn.example.org/models/%C0%AE%C0%AE/secret", MALFORMED),
    ("https://cdn.example.org/models/%c0%af..%c0%afsecret", MALFORMED),
    ("https://cdn.example.org/models/%e0%80%ae%e0%80%ae/secret", MALFORMED),
    ("https://cdn.example.org/models/%c1%9c..%c1%9csecret", MALFORMED),
    ("https://cdn.example.org/models/%ff.gguf", MALFORMED),
    ("https://cdn.example.org/models/%ed%a0%80.gguf", MALFORMED),
    ("https://cdn.example.org/models/caf%c3%a9.gguf", OK),
    ("https://cdn.example.org/models/x.gguf?sig=%ff%c0%ae", OK),
    # Unicode look-alikes of ".", "/", "\\" and other ASCII punctuation, valid UTF-8: servers
    # that normalise Unicode (NFKC, NFKD, Windows "best fit") read "%EF%BC%8E%EF%BC%8E" as "..".
    ("https://cdn.example.org/models/%EF%BC%8E%EF%BC%8E/secret", MALFORMED),  # U+FF0E
    ("https://cdn.example.org/models/%ef%bc%8e%ef%bc%8e/secret", MALFORMED),
    ("https://cdn.example.org/models/%E2%80%A4%E2%80%A4/secret", MALFORMED),  # U+2024
    ("https://cdn.example.org/models/%EF%B9%92%EF%B9%92/secret", MALFORMED),  # U+FE52
    ("https://cdn.example.org/models/..%EF%BC%8Fsecret", MALFORMED),  # U+FF0F
    ("https://cdn.example.org/models/..%E2%88%95secret", MALFORMED),  # U+2215
    ("https://cdn.example.org/models/..%E2%81%84secret", MALFORMED),  # U+2044
    ("https://cdn.example.org/models/..%E2%A7%B8secret", MALFORMED),  # U+29F8
    ("https://cdn.example.org/models/..%EF%BC%BCsecret", MALFORMED),  # U+FF3C
    ("https://cdn.example.org/models/..%EF%B9%A8secret", MALFORMED),  # U+FE68
    ("https://cdn.example.org/models/..%E2%88%96secret", MALFORMED),  # U+2216
    ("https://cdn.example.org/models/x%E3%80%82gguf", MALFORMED),  # U+3002
    ("https://cdn.example.org/models/x%EF%BC%9Bv/y", MALFORMED),  # U+FF1B, a ";"
    ("https://cdn.example.org/models/x%EF%BC%85y", MALFORMED),  # U+FF05, a "%"
    ("https://cdn.example.org/models/x%EF%BC%9Fy", MALFORMED),  # U+FF1F, a "?"
    ("https://cdn.example.org/models/x%EF%BC%83y", MALFORMED),  # U+FF03, a "#"
    ("https://cdn.example.org/models/x%C2%A0y", MALFORMED),  # no-break space, " " under NFKC
    ("https://cdn.example.org/models/x%E2%80%8By", MALFORMED),  # zero width space (Cf)
    ("https://cdn.example.org/models/%E2%92%88/x", MALFORMED),  # "⒈" (a number): "1." under NFKC
    ("https://cdn.example.org/models/%C2%BD", MALFORMED),  # "½": "1⁄2", a fraction slash
    ("https://cdn.example.org/models/a=%CC%B8", MALFORMED),  # "=" + U+0338: "≠" under NFKC
    # Dots that a server folding accents away (marks dropped after NFKD), or dropping invisible
    # characters (NFKC_Casefold), reads as "..": marks not on a letter or number, ignorables.
    ("https://cdn.example.org/models/..%CC%81/secret", MALFORMED),  # U+0301 on a "."
    ("https://cdn.example.org/models/.%CC%81./secret", MALFORMED),
    ("https://cdn.example.org/models/%CC%81../secret", MALFORMED),  # a mark on nothing
    ("https://cdn.example.org/models/..%EF%B8%8F/secret", MALFORMED),  # U+FE0F, a selector
    ("https://cdn.example.org/models/..%CD%8F/secret", MALFORMED),  # U+034F (grapheme joiner)
    ("https://cdn.example.org/models/.%E1%85%9F./secret", MALFORMED),  # U+115F, a Hangul filler
    ("https://cdn.example.org/models/..%F3%A0%84%80/secret", MALFORMED),  # U+E0100
    ("https://cdn.example.org/models/%E6%A8%A1%F3%A0%84%80.gguf", MALFORMED),  # even on a name
    ("https://cdn.example.org/models/1%E2%83%A3.gguf", OK),  # a mark on a digit: "1⃣"
    ("https://cdn.example.org/models/%E0%A4%95%E0%A4%BF%E0%A4%82.gguf", OK),  # "किं", two marks
    # Names in any script keep both: decomposed or not, CJK, fullwidth digits.
    ("https://cdn.example.org/models/mod%C3%A8le.gguf", OK),
    ("https://cdn.example.org/models/mode%CC%80le.gguf", OK),
    ("https://cdn.example.org/models/%E6%A8%A1%E5%9E%8B.gguf", OK),
    ("https://cdn.example.org/models/%E3%83%A2%E3%83%87%E3%83%AB%E3%83%BC.gguf", OK),
    ("https://cdn.example.org/models/%EF%BC%91b/x.gguf", OK),
    ("https://cdn.example.org/models/%CE%BC-%C3%9F_~.gguf?x=%EF%BC%8E", OK),
    # Characters some clients re-encode and others send as they are.
    ('https://models.example.com/a"b', MALFORMED),
    ("https://models.example.com/a<b>", MALFORMED),
    ("https://models.example.com/a{b}", MALFORMED),
    ("https://models.example.com/a[b]", MALFORMED),
    ("https://models.example.com/a|b", MALFORMED),
    ("https://models.example.com/a^b", MALFORMED),
    ("https://models.example.com/a`b", MALFORMED),
    # Dot and empty segments.
    ("https://cdn.example.org/models/../secret", MALFORMED),
    ("https://cdn.example.org/models/./x", MALFORMED),
    ("https://cdn.example.org/models/..", MALFORMED),
    ("https://cdn.example.org/models/.", MALFORMED),
    ("https://cdn.example.org/models//x", MALFORMED),
    ("https://models.example.com//evil.net/x", MALFORMED),
    # Dot and empty segments with a path parameter: Tomcat, Jetty and Spring drop ";..." from
    # each segment before resolving dots, so these leave the allowlisted prefix there.
    ("https://cdn.example.org/models/..;/secret/x.gguf", MALFORMED),
    ("https://cdn.example.org/models/..;jsessionid=1/secret", MALFORMED),
    ("https://cdn.example.org/models/.;/x", MALFORMED),
    ("https://cdn.example.org/models/;/x", MALFORMED),
    ("https://cdn.example.org/models/x/..;", MALFORMED),
    ("https://cdn.example.org/models/x;v=1/y.gguf", OK),
    ("https://cdn.example.org/models/..x;/y.gguf", OK),
    # The same with the ";" percent-encoded: a front server that decodes the path (nginx) and
    # forwards it to one that drops path parameters reads "..%3b" as "..;", hence "..".
    ("https://cdn.example.org/models/..%3b/secret/x.gguf", MALFORMED),
    ("https://cdn.example.org/models/..%3B/secret/x.gguf", MALFORMED),
    ("https://cdn.example.org/models/.%3bx/y.gguf", MALFORMED),
    ("https://cdn.example.org/models/x/..%3B", MALFORMED),
    ("https://cdn.example.org/models/x%3Bv=1/y.gguf", OK),
    # Segments Win32 path handling (IIS, Windows file servers and mirrors) reads as "." or "..":
    # it strips trailing dots and spaces from each component and reads "name:stream" as a
    # stream of "name", so all of these leave the allowlisted prefix on such an origin.
    ("https://cdn.example.org/models/..%20/secret", MALFORMED),
    ("https://cdn.example.org/models/.../secret", MALFORMED),
    ("https://cdn.example.org/models/..%3A/x", MALFORMED),
    ("https://cdn.example.org/models/..%3ax/x", MALFORMED),
    ("https://cdn.example.org/models/..:/x", MALFORMED),
    ("https://cdn.example.org/models/..::$DATA/x", MALFORMED),
    ("https://cdn.example.org/models/..%3A%3A$DATA/x", MALFORMED),
    ("https://cdn.example.org/models/..../x", MALFORMED),
    ("https://cdn.example.org/models/..%20./x", MALFORMED),
    ("https://cdn.example.org/models/..%20%20/x", MALFORMED),
    ("https://cdn.example.org/models/.%20/x", MALFORMED),
    ("https://cdn.example.org/models/.%20.%20/x", MALFORMED),
    ("https://cdn.example.org/models/%20../x", MALFORMED),
    ("https://cdn.example.org/models/%20/x", MALFORMED),
    ("https://cdn.example.org/models/.:x/y", MALFORMED),
    ("https://cdn.example.org/models/:x/y", MALFORMED),
    ("https://cdn.example.org/models/::$DATA", MALFORMED),
    ("https://cdn.example.org/models/...;x/y", MALFORMED),
    ("https://cdn.example.org/models/..%20;x/y", MALFORMED),
    ("https://cdn.example.org/models/..%20%3Bx/y", MALFORMED),
    ("https://cdn.example.org/models/x/...", MALFORMED),
    ("https://cdn.example.org/models/x/..%20", MALFORMED),
    ("https://cdn.example.org/models/x/..:x", MALFORMED),
    ("https://models.example.com/.../x", MALFORMED),
    ("https://models.example.com/..%20", MALFORMED),
    # The same behind a front server that decodes the path and a server that parses it again:
    # a decoded "?" or "#" starts the query or fragment there, so "..%3F" is "..".
    ("https://cdn.example.org/models/..%3F/secret", MALFORMED),
    ("https://cdn.example.org/models/..%3f", MALFORMED),
    ("https://cdn.example.org/models/x/..%23x", MALFORMED),
    ("https://cdn.example.org/models/.%3Fx/y", MALFORMED),
    ("https://cdn.example.org/models/..%20%3F/y", MALFORMED),
    ("https://cdn.example.org/models/..%3F;x/y", MALFORMED),
    ("https://cdn.example.org/models/%3Fx/y", MALFORMED),
    # "+" is a space to servers that decode a path as form data (Java's URLDecoder, PHP's
    # urldecode, .NET's HttpUtility.UrlDecode), and Win32 then strips it: "..+" is "..".
    ("https://cdn.example.org/models/..+/secret", MALFORMED),
    ("https://cdn.example.org/models/.+./secret", MALFORMED),
    ("https://cdn.example.org/models/+/x", MALFORMED),
    ("https://cdn.example.org/models/..+:x/y", MALFORMED),
    # A letter that folding accents away removes: U+FF9E and U+FF9F, the halfwidth katakana
    # voiced sound marks, are letters whose NFKD form is a combining mark, so "..%EF%BE%9E"
    # is ".." to a server that folds accents.
    ("https://cdn.example.org/models/..%EF%BE%9E/secret", MALFORMED),
    ("https://cdn.example.org/models/.%EF%BE%9F/secret", MALFORMED),
    ("https://cdn.example.org/models/%EF%BE%9E/secret", MALFORMED),
    # Names with dots, spaces or a ":" that are still names to such a server.
    ("https://cdn.example.org/models/x./y", OK),
    ("https://cdn.example.org/models/X./X", OK),
    ("https://cdn.example.org/models/x.", OK),
    ("https://cdn.example.org/models/a..b", OK),
    ("https://cdn.example.org/models/model..gguf", OK),
    ("https://cdn.example.org/models/.hidden/x", OK),
    ("https://cdn.example.org/models/v1.0/x.gguf", OK),
    ("https://cdn.example.org/models/~", OK),
    ("https://cdn.example.org/models/..x/y", OK),
    ("https://cdn.example.org/models/.%20x/y", OK),
    ("https://cdn.example.org/models/my%20model.gguf", OK),
    ("https://cdn.example.org/models/xy:z/z", OK),
    ("https://cdn.example.org/models/model.gguf::$DATA", OK),
    ("https://cdn.example.org/models/x/;v=1", OK),
    ("https://cdn.example.org/models/x%3Fy/z.gguf", OK),
    ("https://cdn.example.org/models/x%23y/z.gguf", OK),
    ("https://cdn.example.org/models/c++/x.gguf", OK),
    ("https://cdn.example.org/models/x+/+x/a+b.gguf", OK),
    ("https://cdn.example.org/models/%EF%BD%B6%EF%BE%9E.gguf", OK),
    ("https://cdn.example.org/models/..%E3%82%AC/x", OK),
    # Segments Win32 path handling reads as a drive: a name whose second character is ":" is
    # drive-relative ("c:secret") or, followed by "/", drive-absolute, and a server joining it
    # onto its root the way PathCombine or os.path.join does leaves the root for that drive.
    # Windows takes any one character as a drive letter ("subst +: C:\x"), not only A to Z.
    ("https://cdn.example.org/models/c:secret", MALFORMED),
    ("https://cdn.example.org/models/c:/secret", MALFORMED),
    ("https://cdn.example.org/models/C%3A/secret", MALFORMED),
    ("https://cdn.example.org/models/c%3a/secret", MALFORMED),
    ("https://cdn.example.org/models/c%3A%5Csecret", MALFORMED),
    ("https://cdn.example.org/models/c:", MALFORMED),
    ("https://cdn.example.org/models/x/Z:", MALFORMED),
    ("https://cdn.example.org/models/c:;x/y", MALFORMED),
    ("https://cdn.example.org/models/c%3A%3Bx/y", MALFORMED),
    ("https://cdn.example.org/models/x:y/z", MALFORMED),
    ("https://cdn.example.org/models/x::$DATA", MALFORMED),
    ("https://cdn.example.org/models/%63:secret", MALFORMED),
    ("https://cdn.example.org/models/1:secret", MALFORMED),
    ("https://cdn.example.org/models/+:secret", MALFORMED),
    ("https://cdn.example.org/models/%E2%82%AC:secret", MALFORMED),
    ("https://models.example.com/c:/secret", MALFORMED),
    ("https://models.example.com/C:", MALFORMED),
    # The same once a server normalises: fullwidth "c" (one character, "c" best fit),
    # "dz" as one letter (NFKC "dz"), two Hangul jamo that NFKC composes into one syllable,
    # and "c" or "x" with combining marks, which a server that folds accents reads as "c:".
    ("https://cdn.example.org/models/%EF%BD%83:secret", MALFORMED),
    ("https://cdn.example.org/models/%C7%86:secret", MALFORMED),
    ("https://cdn.example.org/models/%E1%84%80%E1%85%A1:secret", MALFORMED),
    ("https://cdn.example.org/models/c%CC%81:secret", MALFORMED),
    ("https://cdn.example.org/models/x%CC%B4:secret", MALFORMED),
    ("https://cdn.example.org/models/x%CC%88%CC%81:secret", MALFORMED),
    # Names: more than one character before the ":", a ";" before it, or none at all.
    ("https://cdn.example.org/models/llama3:8b", OK),
    ("https://cdn.example.org/models/model.gguf", OK),
    ("https://cdn.example.org/models/ab:c/d", OK),
    ("https://cdn.example.org/models/c;x:/y", OK),
    ("https://cdn.example.org/models/c", OK),
    ("https://cdn.example.org/models/%C3%A8%C3%A8:x", OK),
    ("https://cdn.example.org/models/%E1%84%80%E1%85%A1%E1%84%80:x", OK),
    ("https://cdn.example.org/models/c%CC%81x:y", OK),
    ("https://cdn.example.org/models/%C7%86x:y", OK),
    # Reserved device names (CON, NUL, COM1, ...) are no way out of the root: still allowed.
    ("https://cdn.example.org/models/CON", OK),
    ("https://cdn.example.org/models/nul.gguf", OK),
    # Fragments.
    ("https://models.example.com/x#frag", MALFORMED),
    ("https://evil.net#@models.example.com/", MALFORMED),
    ("https://models.example.com/#", MALFORMED),
    # Hosts: empty, scheme-relative, missing authority, malformed names, IPv6.
    ("https:///tiny.gguf", MALFORMED),
    ("https://:443/tiny.gguf", MALFORMED),
    ("https:/models.example.com/tiny.gguf", MALFORMED),
    ("https:models.example.com/tiny.gguf", MALFORMED),
    ("//models.example.com/tiny.gguf", MALFORMED),
    ("/tiny.gguf", MALFORMED),
    ("models.example.com/tiny.gguf", MALFORMED),
    ("", MALFORMED),
    ("https://", MALFORMED),
    ("https://models.example.com./x", MALFORMED),
    ("https://.models.example.com/x", MALFORMED),
    ("https://models..example.com/x", MALFORMED),
    ("https://-models.example.com/x", MALFORMED),
    ("https://models.example.com-/x", MALFORMED),
    ("https://models.exa!mple.com/x", MALFORMED),
    ("https://[::1]/x", MALFORMED),
    ("https://[::1/x", MALFORMED),
    ("https://::1/x", MALFORMED),
    # Ports.
    ("https://models.example.com:/x", MALFORMED),
    ("https://models.example.com:0/x", MALFORMED),
    ("https://models.example.com:65536/x", MALFORMED),
    ("https://models.example.com:99999/x", MALFORMED),
    ("https://models.example.com:443443/x", MALFORMED),
    ("https://models.example.com:-1/x", MALFORMED),
    ("https://models.example.com:+443/x", MALFORMED),
    ("https://models.example.com:4_43/x", MALFORMED),
    ("https://models.example.com:443:443/x", MALFORMED),
    ("https://models.example.com:https/x", MALFORMED),
    ("https://models.example.com:０443/x", MALFORMED),
]


@pytest.mark.security
@pytest.mark.parametrize(("url", "expected"), CASES)
def test_source_url_cases(url: str, expected: str) -> None:
    verdict = cr.validate_source_url(url, ALLOWLIST)
    assert verdict.reason == expected
    assert verdict.ok is (expected == OK)


@pytest.mark.security
@pytest.mark.parametrize(
    "allowlist",
    [
        [],
        (),
        set(),
        frozenset(),
        ["https://other.example.net/"],
        ["http://models.example.com/"],
        ["https://models.example.com/?a=1"],
        ["https://models.example.com/#x"],
        ["https://user@models.example.com/"],
        ["//models.example.com/"],
        ["models.example.com"],
        ["https://models.example.com/../"],
        ["https://models.example.com:8443/"],
        ["https://models.example.com/tiny"],
        [b"https://models.example.com/"],
        [None, 3, ["https://models.example.com/"]],
        [SneakyStr("https://models.example.com/")],
    ],
)
def test_allowlists_that_grant_nothing(allowlist: object) -> None:
    verdict = cr.validate_source_url("https://models.example.com/tiny.gguf", allowlist)
    assert verdict.reason == NOT_ALLOWED


@pytest.mark.security
@pytest.mark.parametrize(
    "allowlist",
    [
        "https://models.example.com/",
        b"https://models.example.com/",
        bytearray(b"https://models.example.com/"),
        None,
        {"https://models.example.com/": True},
        iter(["https://models.example.com/"]),
        (entry for entry in ["https://models.example.com/"]),
        type("ListLike", (list,), {})(["https://models.example.com/"]),
        42,
    ],
)
def test_allowlist_of_the_wrong_type_denies(allowlist: object) -> None:
    # A bare string would otherwise be iterated character by character.
    verdict = cr.validate_source_url("https://models.example.com/tiny.gguf", allowlist)
    assert verdict.reason == MALFORMED


@pytest.mark.parametrize(
    "allowlist",
    [
        ["https://models.example.com/"],
        ("https://models.example.com/",),
        {"https://models.example.com/"},
        frozenset({"https://models.example.com/"}),
        [None, "garbage", "https://models.example.com/"],
    ],
)
def test_every_allowed_container_type_works(allowlist: object) -> None:
    assert cr.validate_source_url("https://models.example.com/tiny.gguf", allowlist).ok


@pytest.mark.parametrize(
    ("entry", "url", "expected"),
    [
        ("https://models.example.com", "https://models.example.com/x", OK),
        ("HTTPS://MODELS.EXAMPLE.COM/", "https://models.example.com/x", OK),
        ("https://models.example.com:8443/", "https://models.example.com:8443/x", OK),
        ("https://models.example.com:8443/", "https://models.example.com/x", NOT_ALLOWED),
        ("https://models.example.com:443/", "https://models.example.com/x", OK),
        (
            "https://cdn.example.org/models/tiny.gguf",
            "https://cdn.example.org/models/tiny.gguf",
            OK,
        ),
        (
            "https://cdn.example.org/models/tiny.gguf",
            "https://cdn.example.org/models/tiny.gguf.evil",
            NOT_ALLOWED,
        ),
        ("https://cdn.example.org/models", "https://cdn.example.org/models/tiny.gguf", OK),
        ("https://cdn.example.org/models", "https://cdn.example.org/models.evil/x", NOT_ALLOWED),
        ("https://127.0.0.1/", "https://127.0.0.1/x", OK),
        ("https://xn--bcher-kva.example/", "https://xn--bcher-kva.example/x", OK),
    ],
)
def test_entry_shapes(entry: str, url: str, expected: str) -> None:
    assert cr.validate_source_url(url, [entry]).reason == expected


@pytest.mark.security
@given(url=garbage(), allowlist=garbage())
@THOROUGH
def test_never_raises_and_never_allows_garbage(url: object, allowlist: object) -> None:
    verdict = cr.validate_source_url(url, allowlist)
    assert type(verdict) is cr.Verdict
    if type(url) is not str:
        assert verdict.reason == MALFORMED


# ---- generated URLs against an independent oracle -----------------------------------------

TOKENS = [
    "https://",
    "HTTPS://",
    "http://",
    "https:",
    "https:/",
    "//",
    "/",
    "\\",
    "@",
    ":",
    ":443",
    ":8443",
    ":0443",
    ":0",
    ":65536",
    "?",
    "#",
    "&",
    "=",
    ".",
    "..",
    "/../",
    "/./",
    ";",
    "..;",
    "..%3b",
    "%3B",
    "...",
    "..%20",
    "%20",
    "..%3A",
    "%3a",
    ":x",
    "c:",
    "C%3A",
    "%2e",
    "%2E",
    "%2f",
    "%5c",
    "%40",
    "%41",
    "%00",
    "%",
    "[",
    "]",
    "\t",
    "\n",
    " ",
    "\x00",
    "\u3002",
    "\uff0e",
    "о",
    "models.example.com",
    "MODELS.EXAMPLE.COM",
    "models.example.com.",
    "models.example.com.evil.net",
    "evil.net",
    "cdn.example.org",
    "models",
    "models/",
    "tiny.gguf",
    "user",
    "x",
]
ENTRIES = [
    *ALLOWLIST,
    "https://cdn.example.org/models",
    "https://mirror.example.net:8443/blobs/",
    "http://plain.example.com/",
    "https://models.example.com/?q=1",
    "https://user@models.example.com/",
]


def oracle_allows(url: str, allowlist: list[str]) -> bool:
    """``urllib.parse.urlsplit`` plus the contract's explicit rules; shares no code with the
    module under test."""
    if not url.isascii() or any(ord(c) <= 0x20 or c in "\x7f\\#" for c in url):
        return False
    if any(bad in url.lower() for bad in ("%2e", "%2f", "%5c")):
        return False
    try:
        split = urlsplit(url)
        port = split.port or 443
    except ValueError:
        return False
    if split.scheme.lower() != "https" or "@" in split.netloc or not split.hostname:
        return False
    if not url.lower().startswith("https://"):
        return False
    segments = (split.path or "/").split("/")
    if any(re.split(r";|%3[bB]", segment, maxsplit=1)[0] in (".", "..") for segment in segments):
        return False
    if any(win32_reads_a_dot_segment(segment) for segment in segments):
        return False
    if any(win32_reads_a_drive(segment) for segment in segments):
        return False
    for entry in allowlist:
        try:
            entry_split = urlsplit(entry)
            entry_port = entry_split.port or 443
        except ValueError:
            continue
        if (
            entry_split.scheme.lower() != "https"
            or "@" in entry_split.netloc
            or entry_split.query
            or not entry_split.hostname
        ):
            continue
        entry_segments = (entry_split.path or "/").split("/")
        prefix = entry_segments[:-1] if entry_segments[-1] == "" else entry_segments
        if (
            split.hostname == entry_split.hostname
            and port == entry_port
            and segments[: len(prefix)] == prefix
        ):
            return True
    return False


def win32_reads_a_dot_segment(segment: str) -> bool:
    """Does a Windows server read the percent-encoded ``segment`` as ``.``, ``..`` or nothing?
    It drops a ``;`` parameter, a ``:stream`` and what a decoded ``?`` or ``#`` starts, then
    trailing dots and spaces (``+`` decoded as form data is one), as written, under NFKC, or
    with accents folded away."""
    name = unquote(segment).split(";")[0]
    nfkd = unicodedata.normalize("NFKD", name)
    readings = (
        name,
        unicodedata.normalize("NFKC", name),
        "".join(char for char in nfkd if not unicodedata.category(char).startswith("M")),
    )
    for reading in readings:
        stem = re.split("[:?#]", reading)[0].replace("+", " ")
        while stem[-1:] in (".", " "):
            stem = stem[:-1]
        if name != "" and stem in ("", ".", ".."):
            return True
    return False


def win32_reads_a_drive(segment: str) -> bool:
    """Does a Windows server read the percent-encoded ``segment`` as a drive (``c:``,
    ``c:x``), once it has dropped a ``;`` parameter and normalised the name (NFKC, or NFKD
    with accents folded away)? ``ntpath`` reads the drive, as ``PathCombine`` does."""
    name = unquote(segment).split(";")[0]
    nfkd = unicodedata.normalize("NFKD", name)
    readings = (
        name,
        unicodedata.normalize("NFKC", name),
        "".join(char for char in nfkd if not unicodedata.category(char).startswith("M")),
    )
    return any(ntpath.splitdrive(reading)[0] != "" for reading in readings)


urls = st.one_of(
    st.lists(st.sampled_from(TOKENS), min_size=1, max_size=8).map("".join),
    st.tuples(st.sampled_from(ENTRIES), st.lists(st.sampled_from(TOKENS), max_size=5)).map(
        lambda pair: pair[0] + "".join(pair[1])
    ),
    st.text(alphabet="ab./:@?#%2e5cfEF\\ \t[]-_019hpst", max_size=40),
)


@pytest.mark.security
@given(url=urls, allowlist=st.lists(st.sampled_from(ENTRIES), max_size=4))
@example(url="https://models.example.com.evil.net/", allowlist=ALLOWLIST)
@example(url="https://models.example.com@evil.net/", allowlist=ALLOWLIST)
@example(url="https://models.example.com\\@evil.net/", allowlist=ALLOWLIST)
@example(url="https://models.example.com/%2e%2e/x", allowlist=ALLOWLIST)
@example(url="https://cdn.example.org/models%2fx", allowlist=ALLOWLIST)
@example(url="https://models.example.com\t/x", allowlist=ALLOWLIST)
@example(url="https://mоdels.example.com/x", allowlist=ALLOWLIST)
@example(url="https://models.example.com:8443/x", allowlist=ALLOWLIST)
@example(url="https:/models.example.com/x", allowlist=ALLOWLIST)
@example(url="//models.example.com/x", allowlist=ALLOWLIST)
@example(url="HTTPS://models.example.com/x", allowlist=ALLOWLIST)
@THOROUGH
def test_accepted_urls_name_an_allowlisted_host_port_and_path(
    url: str, allowlist: list[str]
) -> None:
    verdict = cr.validate_source_url(url, allowlist)
    assert type(verdict) is cr.Verdict
    if verdict.ok:
        assert oracle_allows(url, allowlist), url


@pytest.mark.security
@given(
    segment=st.lists(
        st.sampled_from(
            [".", "%20", ":", "%3A", ";", "x", "$", "%C3%A8", "+", "%3F", "%23", "%EF%BE%9E"]
        ),
        min_size=1,
    ).map("".join),
    last=st.booleans(),
)
@THOROUGH
def test_a_segment_is_refused_exactly_when_windows_reads_it_as_a_dot_segment_or_a_drive(
    segment: str, last: bool
) -> None:
    url = "https://cdn.example.org/models/" + segment + ("" if last else "/x.gguf")
    name = unquote(segment).split(";")[0]
    # An empty name is refused inside the path, not at its end (a trailing "/", or "/;v=1").
    refused = (
        win32_reads_a_dot_segment(segment)
        or win32_reads_a_drive(segment)
        or (name == "" and not last)
    )
    assert cr.validate_source_url(url, ALLOWLIST).reason == (MALFORMED if refused else OK)


SAFE_SEGMENT = st.text(
    alphabet=string.ascii_letters + string.digits + "-_~", min_size=1, max_size=12
)


@given(
    entry=st.sampled_from(
        [
            "https://models.example.com/",
            "https://cdn.example.org/models/",
            "https://cdn.example.org/models",
        ]
    ),
    segments=st.lists(SAFE_SEGMENT, min_size=1, max_size=5),
    upper_host=st.booleans(),
    explicit_port=st.booleans(),
    query=st.none() | st.text(alphabet=string.ascii_letters + "=&", max_size=10),
)
@THOROUGH
def test_every_plain_url_inside_an_entry_is_accepted(
    entry: str, segments: list[str], upper_host: bool, explicit_port: bool, query: str | None
) -> None:
    split = urlsplit(entry)
    host = split.netloc.upper() if upper_host else split.netloc
    if explicit_port:
        host += ":443"
    base = split.path if split.path.endswith("/") else split.path + "/"
    url = f"https://{host}{base}{'/'.join(segments)}"
    if query is not None:
        url += "?" + query
    assert cr.validate_source_url(url, [entry]) is cr.ALLOW


@pytest.mark.security
@given(
    host=st.text(alphabet=string.ascii_lowercase + ".-", min_size=1, max_size=30),
    path=st.lists(SAFE_SEGMENT, max_size=3).map("/".join),
)
@THOROUGH
def test_no_other_host_is_accepted(host: str, path: str) -> None:
    url = f"https://{host}/{path}"
    verdict = cr.validate_source_url(url, ["https://models.example.com/"])
    if verdict.ok:
        assert host == "models.example.com"
