"""``ovh``: SMS through the OVHcloud SMS API (``/sms/{serviceName}/jobs``).

One JSON request per message::

    POST {base_url or https://eu.api.ovh.com/1.0}/sms/{service_name}/jobs
    {"receivers": ["+33612345678"], "message": "...", "sender": "ASSURANCE", "noStopClause": true,
     "charset": "UTF-8", "coding": "7bits", "priority": "high", "validityPeriod": 2880}

signed as every OVHcloud API call is: the headers ``X-Ovh-Application`` (application key),
``X-Ovh-Consumer`` (consumer key), ``X-Ovh-Timestamp`` (Unix seconds) and ``X-Ovh-Signature``::

    "$1$" + sha1_hex(application_secret + "+" + consumer_key + "+" + METHOD + "+" + full URL
                     + "+" + body + "+" + timestamp)

(:func:`signature`). The timestamp is the local clock: keep the host on NTP, OVH refuses requests whose
timestamp drifts too far from its own clock::

    providers:
      ovh:
        type: ovh
        application_key: 7kbG7Bk7S9Nt7ZSV
        application_secret: ${OVH_APPLICATION_SECRET}
        consumer_key: ${OVH_CONSUMER_KEY}
        service_name: sms-ab12345-1
        sender: ASSURANCE
        no_stop_clause: true                 # false on marketing accounts

``noStopClause``: the driver does not know a campaign's category. ``no_stop_clause: true`` (the default)
declares the account's traffic informational / public-service: OVH neither appends its "STOP 36111"
mention nor holds the SMS at night and on weekends. **Marketing accounts must set it false**: OVH then
appends its STOP mention and applies the commercial sending window. The engine's own ``stop_mention`` is
appended before the driver sees the body; this driver never appends it again.

``coding`` is ``7bits`` when the text is GSM-7 (:func:`smartpush.sms.is_gsm7`), ``8bits`` (UCS-2)
otherwise. Without a ``sender`` the job asks for ``senderForResponse`` (an OVH short number).

A 200 answer is ``{ids, invalidReceivers, validReceivers, totalCreditsRemoved}``: a receiver listed in
``invalidReceivers`` is a :class:`PermanentError` that suppresses the number; otherwise ``ids[0]`` is
the provider reference. An error answer is ``{errorCode, httpCode, message}``: 401/403 are technical
(credentials, access rules), 404 too (``service_name`` does not exist: never the recipient's fault), 429
throttles, 5xx retry; a 400 is technical unless its message is about the receiver. OVH's ``message`` is
never repeated: it may quote the number.

:func:`parse_receipt` reads the delivery receipt OVH sends to the SMS account's callback URL (query
fields ``id``, ``dlr``, ``ptt``) into a :class:`~smartpush.provider.Receipt`; ``smartpush serve``
receives them at ``/webhooks/{account}``. OVH does not sign its callbacks: the account gives a
``webhook_secret`` and the callback URL set at OVH carries it, ``.../webhooks/ovh?token=<secret>``.
No ``ptt`` code is known to mean a dead number, so OVH receipts never suppress a number.

Replies (``/inbound/{account}``) are read from ``sender`` (or ``from``) and ``message`` (or ``text``):
**unverified**, no OVH documentation of an incoming-SMS callback was at hand; check a real one first.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any, ClassVar, Literal
from urllib.parse import quote

from pydantic import Field, SecretStr, field_validator

from smartpush.errors import PermanentError, ProviderError, TechnicalError
from smartpush.http import HttpProvider, HttpResponse, classify_status, retry_after
from smartpush.provider import (
    Channel,
    HttpSmsProviderOptions,
    InboundSms,
    OutboundMessage,
    ProviderOptions,
    Receipt,
    ReceiptStatus,
    SendResult,
    WebhookRequest,
)
from smartpush.sms import analyse, is_gsm7

__all__ = [
    "DEFAULT_BASE_URL",
    "ERROR_CODES",
    "OvhOptions",
    "OvhProvider",
    "parse_receipt",
    "signature",
]

DEFAULT_BASE_URL = "https://eu.api.ovh.com/1.0"
#: Minutes OVH keeps trying to deliver when the account does not say (OVH's own default).
DEFAULT_VALIDITY_MINUTES = 2880
_SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_KEY = re.compile(r"^\S+$")
#: A 400 whose message names the receiver is about the number, not our request.
_RECEIVER = re.compile(r"receiver|recipient|destinat", re.IGNORECASE)

#: OVHcloud API ``errorCode`` -> a text without any address (the HTTP status decides the kind).
ERROR_CODES: Mapping[str, str] = {
    "INVALID_KEY": "OVH does not know this application_key",
    "INVALID_CREDENTIAL": "OVH refused the consumer_key: it is unknown, expired or not validated",
    "NOT_CREDENTIAL": "OVH asks for a consumer_key: check consumer_key",
    "NOT_GRANTED_CALL": "the consumer_key is not granted POST /sms/*/jobs",
    "INVALID_SIGNATURE": "OVH refused the request signature: check application_secret and consumer_key",
    "QUERY_TIME_OUT_OF_BOUNDS": "OVH refused the request timestamp: synchronise the host clock (NTP)",
    "FORBIDDEN_BY_IP": "OVH refused the request from this IP address (access rules of the credentials)",
}


def signature(
    application_secret: str, consumer_key: str, method: str, url: str, body: str, timestamp: int
) -> str:
    """The ``X-Ovh-Signature`` header of one request."""
    material = "+".join([application_secret, consumer_key, method.upper(), url, body, str(timestamp)])
    return "$1$" + hashlib.sha1(material.encode("utf-8")).hexdigest()  # OVH signs with SHA-1


def _encode(document: Mapping[str, Any]) -> str:
    """The body exactly as :class:`HttpTransport` sends a ``json=`` argument: what is signed."""
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"))


# -- options ------------------------------------------------------------------------------------------


class OvhOptions(HttpSmsProviderOptions):
    """An ``ovh`` account: the API credentials, the SMS account (service) and how jobs are sent."""

    #: The application key (``AK``) shown when the application was created.
    application_key: str
    #: The application secret (``AS``).
    application_secret: SecretStr
    #: The consumer key (``CK``) validated for ``POST /sms/*/jobs``.
    consumer_key: SecretStr
    #: The SMS account, e.g. ``sms-ab12345-1``.
    service_name: str
    #: ``True``: informational / public-service traffic, OVH adds no STOP mention and no time window.
    #: Marketing accounts set it ``False``.
    no_stop_clause: bool = True
    #: OVH's delivery priority for these jobs.
    priority: Literal["high", "medium", "low", "veryLow"] = "high"
    #: Minutes the operator keeps trying to deliver.
    validity_period: int = Field(default=DEFAULT_VALIDITY_MINUTES, gt=0)
    #: The secret OVH's callback URLs carry as ``?token=...`` (OVH signs nothing).
    webhook_secret: SecretStr | None = None

    @field_validator("application_key")
    @classmethod
    def _application_key(cls, value: str) -> str:
        if not _KEY.match(value):
            raise ValueError("application_key is the key OVH gave when the application was created")
        return value

    @field_validator("service_name")
    @classmethod
    def _service_name(cls, value: str) -> str:
        if not _SERVICE_NAME.match(value):
            raise ValueError("service_name is the SMS account name, e.g. sms-ab12345-1")
        return value


# -- the driver ---------------------------------------------------------------------------------------


class OvhProvider(HttpProvider):
    """Sends SMS through the OVHcloud SMS API; see the module docstring."""

    channels: ClassVar[frozenset[Channel]] = frozenset({Channel.SMS})
    Options: ClassVar[type[ProviderOptions]] = OvhOptions
    webhooks: ClassVar[frozenset[str]] = frozenset({"receipts", "inbound"})

    def __init__(self, account: str, options: ProviderOptions, **context: Any) -> None:
        super().__init__(account, options, **context)
        if not isinstance(options, OvhOptions):
            raise TypeError("OvhProvider needs OvhOptions")
        self.settings = options
        base = (options.base_url or DEFAULT_BASE_URL).rstrip("/")
        self.url = f"{base}/sms/{quote(options.service_name, safe='')}/jobs"
        clock = context.get("clock")
        self._clock: Callable[[], float] = clock if callable(clock) else time.time

    def job(self, message: OutboundMessage) -> dict[str, Any]:
        """The JSON document sent for ``message``."""
        opts = self.settings
        document: dict[str, Any] = {
            "receivers": [message.to],
            "message": message.body,
            "charset": "UTF-8",
            "coding": "7bits" if is_gsm7(message.body) else "8bits",
            "noStopClause": opts.no_stop_clause,
            "priority": opts.priority,
            "validityPeriod": opts.validity_period,
        }
        sender = message.sender or opts.sender
        if sender is not None:
            document["sender"] = sender
        else:
            document["senderForResponse"] = True
        return document

    def headers(self, method: str, body: str) -> dict[str, str]:
        """The signed OVH headers for a request to :attr:`url` with ``body``."""
        opts = self.settings
        timestamp = int(self._clock())
        consumer = opts.consumer_key.get_secret_value()
        return {
            "Accept": "application/json",
            "X-Ovh-Application": opts.application_key,
            "X-Ovh-Consumer": consumer,
            "X-Ovh-Timestamp": str(timestamp),
            "X-Ovh-Signature": signature(
                opts.application_secret.get_secret_value(), consumer, method, self.url, body, timestamp
            ),
        }

    async def send(self, message: OutboundMessage) -> SendResult:
        document = self.job(message)
        response = await self._client().request(
            "POST", self.url, json=document, headers=self.headers("POST", _encode(document))
        )
        if not 200 <= response.status < 300:  # noqa: PLR2004 - the 2xx range
            raise _error(response)
        return _result(response, message)

    def parse_receipts(self, request: WebhookRequest) -> list[Receipt]:
        receipt = parse_receipt(request.fields())
        return [] if receipt is None else [receipt]

    def parse_inbound(self, request: WebhookRequest) -> InboundSms | None:
        fields = request.fields()  # unverified field names: see the module docstring
        sender = _field(fields, "sender") or _field(fields, "from")
        if not sender:
            return None
        return InboundSms(sender, _field(fields, "message") or _field(fields, "text") or "")


def _result(response: HttpResponse, message: OutboundMessage) -> SendResult:
    document = response.json()
    if not isinstance(document, dict):
        raise TechnicalError("OVH answered without a job document", code="invalid-answer")
    invalid = document.get("invalidReceivers")
    if isinstance(invalid, list) and invalid:
        raise PermanentError("OVH lists the receiver as invalid", code="invalid-receiver", suppress=True)
    ids = document.get("ids")
    if not isinstance(ids, list) or not ids:
        raise TechnicalError("OVH accepted no receiver and gave no job id", code="invalid-answer")
    first = ids[0]
    reference = str(first) if isinstance(first, str | int) and not isinstance(first, bool) else None
    return SendResult(provider_reference=reference, parts=max(analyse(message.body).parts, 1))


def _error(response: HttpResponse) -> ProviderError:
    code: str | None = None
    text = ""
    if response.body:
        try:
            document = response.json()
        except TechnicalError:  # an HTML page from a proxy: the status alone decides
            document = None
        if isinstance(document, dict):
            found = document.get("errorCode")
            code = found if isinstance(found, str) and found else None
            said = document.get("message")
            text = said if isinstance(said, str) else ""
    status = response.status
    detail = ERROR_CODES.get(code or "") or f"OVH answered HTTP {status}" + (f" ({code})" if code else "")
    if status == HTTPStatus.BAD_REQUEST and code not in ERROR_CODES and _RECEIVER.search(text):
        return PermanentError("OVH refused the receiver", code="invalid-receiver", suppress=True)
    if status == HTTPStatus.NOT_FOUND:
        return TechnicalError("OVH does not know this SMS account: check service_name", code=code or "404")
    error = classify_status(status, retry_after_s=retry_after(response.headers), code=code, detail=detail)
    return error or TechnicalError(f"{detail} on an error path", code=code or str(status))


# -- delivery receipts --------------------------------------------------------------------------------

#: The callback's ``dlr`` -> our receipt status; ``4`` (pending) and anything new give no receipt.
_DLR: Mapping[str, ReceiptStatus] = {
    "1": "delivered",
    "2": "permanent-failure",
    "8": "sent",
    "16": "permanent-failure",
}
#: ``ptt`` codes of a failure that may pass (handset or operator trouble, retried by the network).
_TRANSIENT_PTT = frozenset({"1", "2"})


def parse_receipt(form_or_json: Mapping[str, Any]) -> Receipt | None:
    """The receipt an OVH SMS callback carries (query, form or JSON alike); ``None`` when it has none.

    ``id`` is the job id the send returned; ``dlr`` the delivery state; ``ptt`` OVH's detailed code,
    kept as ``error_code`` on failures.
    """
    reference = _field(form_or_json, "id") or _field(form_or_json, "smsId")
    dlr = _field(form_or_json, "dlr") or ""
    mapped = _DLR.get(dlr)
    if not reference or mapped is None:
        return None
    if mapped != "permanent-failure":
        return Receipt(reference, mapped)
    ptt = _field(form_or_json, "ptt") or None
    if ptt in _TRANSIENT_PTT:
        mapped = "temporary-failure"
    return Receipt(reference, mapped, ptt, f"OVH DLR {dlr}" + (f", ptt {ptt}" if ptt else ""))


def _field(values: Mapping[str, Any], name: str) -> str | None:
    value = values.get(name)
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value.strip() if isinstance(value, str) else None
