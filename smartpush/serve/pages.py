"""The HTML pages ``smartpush serve`` shows people: the unsubscribe page, its confirmation, the errors.

French, plain and accessible: ``lang="fr"``, one heading, a real ``<form method="post">`` whose button
says what it does, readable without the style sheet, no JavaScript, no external resource, no cookie.
The one inline style sheet is allowed by its hash in the Content-Security-Policy, nothing else is.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from html import escape

from starlette.responses import HTMLResponse

__all__ = [
    "CONTENT_SECURITY_POLICY",
    "bad_request",
    "confirm",
    "done",
    "not_found",
    "unavailable",
]

_STYLE = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Arial,sans-serif;font-size:1.125rem;"
    "line-height:1.5;color:#161616;background:#fff;margin:0;padding:1.5rem}"
    "main{max-width:40rem;margin:0 auto}"
    "h1{font-size:1.75rem;line-height:1.25}"
    "button{font:inherit;font-weight:700;color:#fff;background:#000091;border:2px solid #000091;"
    "border-radius:.25rem;padding:.75rem 1.5rem;cursor:pointer}"
    "button:hover{background:#1212ff}"
    "button:focus-visible{outline:3px solid #0a76f6;outline-offset:3px}"
    ".note{color:#3a3a3a}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()

#: Nothing may load or run; only the page's own style sheet applies, its form posts to this server.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)

_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class _Words:
    """How a page names a channel in French."""

    label: str  # "e-mail": the channel's name
    one: str  # "un e-mail": what the person received
    ours: str  # "nos e-mails"
    target: str  # "cette adresse e-mail": what will stop receiving them
    target_cap: str


_CHANNELS = {
    "email": _Words("e-mail", "un e-mail", "nos e-mails", "cette adresse e-mail", "Cette adresse e-mail"),
    "sms": _Words("SMS", "un SMS", "nos SMS", "ce numéro de téléphone", "Ce numéro de téléphone"),
    "push": _Words("notifications", "une notification", "nos notifications", "cet appareil", "Cet appareil"),
}


def _page(title: str, body: str, status: int) -> HTMLResponse:
    html = (
        '<!DOCTYPE html>\n<html lang="fr">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="robots" content="noindex, nofollow">\n'
        f"<title>{escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n<main>\n"
        f"{body}</main>\n</body>\n</html>\n"
    )
    return HTMLResponse(html, status_code=status, headers=_HEADERS)


def confirm(campaign: str, channel: str) -> HTMLResponse:
    """The page an unsubscribe link opens: it explains, and asks for a click (a GET changes nothing)."""
    w = _CHANNELS[channel]
    return _page(
        f"Se désabonner ({w.label})",
        f"<h1>Ne plus recevoir {escape(w.ours)} d’information</h1>\n"
        f"<p>Vous avez reçu {escape(w.one)} de la campagne « {escape(campaign)} ».</p>\n"
        f'<p id="effet">Si vous vous désabonnez, {escape(w.target)} ne recevra plus {escape(w.ours)} '
        "d’information. Les messages que la loi nous oblige à vous envoyer pourront encore vous "
        "parvenir.</p>\n"
        '<form method="post">\n'
        '<input type="hidden" name="List-Unsubscribe" value="One-Click">\n'
        '<button type="submit" aria-describedby="effet">Me désabonner</button>\n'
        "</form>\n"
        '<p class="note">Vous ne voulez pas vous désabonner ? Fermez simplement cette page : '
        "rien ne change.</p>\n",
        200,
    )


def done(campaign: str, channel: str) -> HTMLResponse:
    """The answer to the one-click POST and to the page's button."""
    w = _CHANNELS[channel]
    return _page(
        "Désabonnement enregistré",
        "<h1>Votre désabonnement est enregistré</h1>\n"
        f"<p>{escape(w.target_cap)} ne recevra plus {escape(w.ours)} d’information "
        f"(désabonnement demandé depuis la campagne « {escape(campaign)} »).</p>\n"
        '<p class="note">Vous pouvez fermer cette page.</p>\n',
        200,
    )


def not_found() -> HTMLResponse:
    """An unknown, damaged or forged link: no detail on why."""
    return _page(
        "Lien non valide",
        "<h1>Ce lien n’est pas valide</h1>\n"
        "<p>Le lien de désabonnement est peut-être incomplet. Copiez-le en entier depuis le message "
        "reçu, ou utilisez le lien d’un message plus récent.</p>\n",
        404,
    )


def bad_request() -> HTMLResponse:
    """A POST that is not a one-click unsubscribe request."""
    return _page(
        "Demande incomplète",
        "<h1>Votre demande est incomplète</h1>\n"
        "<p>Pour vous désabonner, ouvrez le lien reçu et utilisez le bouton « Me désabonner ».</p>\n",
        400,
    )


def unavailable() -> HTMLResponse:
    """The opt-out could not be recorded now (the ledger is out of reach)."""
    return _page(
        "Service momentanément indisponible",
        "<h1>Service momentanément indisponible</h1>\n"
        "<p>Votre désabonnement n’a pas pu être enregistré. Réessayez dans quelques minutes.</p>\n",
        503,
    )
