# consent-proxy in a container: built in one stage, run as a non-root user from a slim image.
# The policy and the CA are mounted, not baked in:
#   docker build -t consent-proxy .
#   docker run -p 3128:3128 -p 9090:9090 \
#     -v /etc/consent-proxy:/etc/consent-proxy:ro \
#     -v consent-proxy-certs:/var/lib/consent-proxy/certs \
#     -v consent-proxy-audit:/var/log/consent-proxy \
#     consent-proxy
# /etc/consent-proxy/policy.toml must listen on 0.0.0.0 ([listen] proxy = "0.0.0.0:3128",
# admin = "0.0.0.0:9090"), allow the clients' addresses ([clients] allow), and point
# [tls] ca_cert / ca_key at /var/lib/consent-proxy/certs and [audit] path at
# /var/log/consent-proxy/audit.jsonl. A CA key mounted from a Secret must be mode 0600 (or 0400).
# (An example, not tested here: the tests run the binary directly.)

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY policy policy
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /var/lib/consent-proxy --shell /usr/sbin/nologin consent-proxy \
 && install -d -o consent-proxy -m 0700 /var/lib/consent-proxy/certs /var/log/consent-proxy
COPY --from=build /src/target/release/consent-proxy /usr/local/bin/consent-proxy
USER 10001:10001
EXPOSE 3128 9090
# SIGTERM drains: /readyz fails at once, then [limits] drain_delay_secs and shutdown_timeout_secs.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/consent-proxy"]
CMD ["run", "--config", "/etc/consent-proxy/policy.toml"]
