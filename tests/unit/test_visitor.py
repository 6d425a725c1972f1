import pytest

from tracker.ingest.visitor import UserAgents, mask_ip


@pytest.mark.parametrize("address, masked", [
    ("203.0.113.77", "203.0.113.0"),
    ("2001:db8:abcd:12:34:56:78:9a", "2001:db8:abcd::"),
    ("::ffff:198.51.100.9", "198.51.100.0"),
    ("not-an-ip", None),
])
def test_addresses_are_masked_never_kept_whole(address: str, masked: str | None) -> None:
    assert mask_ip(address) == masked


AGENTS = UserAgents()


@pytest.mark.parametrize("ua", [
    "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
    "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
    "Mozilla/5.0 (compatible; Discordbot/2.0; +https://discordapp.com)",
    "TelegramBot (like TwitterBot)",
    "WhatsApp/2.23.20.0",
    "Twitterbot/1.0",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "curl/8.5.0",
    "python-requests/2.31.0",
    "",
])
def test_bots_and_link_previews_are_flagged(ua: str) -> None:
    assert AGENTS.classify(ua)[0] is True


@pytest.mark.parametrize("ua, device", [
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 "
     "(KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1", "mobile"),
    ("Mozilla/5.0 (iPad; CPU OS 16_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/16.0 Mobile/15E148 Safari/604.1", "tablet"),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/120.0 Safari/537.36", "desktop"),
    ("Mozilla/5.0 (Linux; Android 13; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/120.0 Mobile Safari/537.36", "mobile"),
])
def test_people_are_not_bots_and_have_a_device(ua: str, device: str) -> None:
    assert AGENTS.classify(ua) == (False, device)
