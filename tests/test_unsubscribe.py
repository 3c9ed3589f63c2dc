from smartpush.unsubscribe import make_token, read_token, recipient_hash

KEY = b"k" * 48


def test_round_trip_and_no_address_inside() -> None:
    h = recipient_hash(KEY, "email", "jean.dupont@example.fr")
    token = make_token(KEY, campaign="rappel", channel="email", address_hash=h)
    assert read_token(KEY, token) == {"c": "rappel", "ch": "email", "h": h}
    assert "jean" not in token and "example" not in token
    assert len(token) < 160  # fits a List-Unsubscribe header line


def test_forged_or_other_key_tokens_are_refused() -> None:
    token = make_token(KEY, campaign="rappel", channel="sms", address_hash="ab" * 16)
    payload, _, signature = token.partition(".")
    assert read_token(b"other" * 10, token) is None
    assert read_token(KEY, payload + "." + signature[:-2] + "AA") is None
    forged = make_token(b"attacker", campaign="rappel", channel="sms", address_hash="cd" * 16)
    assert read_token(KEY, forged) is None
    assert read_token(KEY, "garbage") is None
    assert read_token(KEY, "") is None


def test_hash_is_keyed_and_per_channel() -> None:
    a = recipient_hash(KEY, "sms", "+33612345678")
    assert a == recipient_hash(KEY, "sms", "+33612345678")
    assert a != recipient_hash(KEY, "email", "+33612345678")
    assert a != recipient_hash(b"x" * 48, "sms", "+33612345678")
