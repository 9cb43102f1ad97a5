"""MX rollup: destinations hosted by one provider share a site name on their delivery jobs."""

from __future__ import annotations

from services.core.config import SiteConfig
from tests.integration.router.conftest import asubmit_many
from tests.support.relais import SENDER_DOMAIN, message, wait_for_events


async def test_domains_on_one_provider_share_a_site(make_stack, make_sink, zone) -> None:
    for name, ip in (
        ("mx1.bigmail.test", "127.0.0.5"),
        ("mx2.bigmail.test", "127.0.0.6"),
        ("in.hoster.test", "127.0.0.7"),
    ):
        zone.add(name, "A", ip)
    zone.add("one.test", "MX", "10 mx1.bigmail.test.")
    zone.add("two.test", "MX", "10 mx2.bigmail.test.", "20 mx1.bigmail.test.")
    zone.add("three.test", "MX", "10 in.hoster.test.")
    zone.add("four.test", "MX", "10 in.hoster.test.")
    stack = await make_stack(sites={"bigmail": SiteConfig(mx=["*.bigmail.test"])})
    for ip in ("127.0.0.5", "127.0.0.6", "127.0.0.7"):
        make_sink(ip)
    rcpts = ["a@one.test", "b@two.test", "c@three.test", "d@four.test"]
    await asubmit_many(stack.smtp_address, [(f"news@{SENDER_DOMAIN}", rcpts, message())])
    delivered = await wait_for_events(stack.config.nats.url, "delivered", 4)
    site_of = {e.recipients[0]: e.site for e in delivered}
    assert site_of == {
        "a@one.test": "bigmail",
        "b@two.test": "bigmail",
        "c@three.test": "hoster.test",  # no rule: the primary MX's registrable domain
        "d@four.test": "hoster.test",
    }
