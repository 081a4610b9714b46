//! The key cache: max-age, rotation, grace, rate limits, single flight, and no keys at all.

use std::sync::Arc;
use std::time::Duration;

use encore::auth::{AuthError, KeySource, KeySourceOptions, KeysFormat, ManualClock, Verifier, VerifierSettings};
use serde_json::json;

use super::support::*;

fn verifier_for(
    url: String,
    clock: &ManualClock,
    tune: impl FnOnce(&mut KeySourceOptions),
) -> (Arc<KeySource>, Verifier) {
    let mut options = KeySourceOptions::new(url, KeysFormat::X509);
    tune(&mut options);
    let keys = Arc::new(KeySource::new(options, clock.shared()).expect("key source"));
    let verifier = Verifier::new(VerifierSettings::new(PROJECT), keys.clone(), clock.shared());
    (keys, verifier)
}

#[tokio::test]
async fn cached_for_max_age_then_refetched() {
    let fixture = Fixture::with(&[key_a()], "public, max-age=100, must-revalidate, no-transform", |_| {}).await;
    fixture.verify(&valid_token()).await.expect("first");
    fixture.clock.advance(Duration::from_secs(99));
    fixture.verify(&valid_token()).await.expect("inside max-age");
    assert_eq!(fixture.server.fetches(), 1, "served from cache inside max-age");
    fixture.clock.advance(Duration::from_secs(1));
    fixture.verify(&valid_token()).await.expect("after max-age");
    assert_eq!(fixture.server.fetches(), 2, "refetched once max-age passed");
    assert_eq!(fixture.keys.fetch_count(), 2);
}

#[tokio::test]
async fn age_header_shortens_the_lifetime() {
    // A shared cache in front of the key server already held the document for 40 s.
    let server = KeyServer::x509(&[key_a()], "public, max-age=100").await;
    server.set_age(Some(40));
    let fixture = Fixture::over(server, KeysFormat::X509, |_| {});
    fixture.verify(&valid_token()).await.expect("first");
    fixture.clock.advance(Duration::from_secs(59));
    fixture.verify(&valid_token()).await.expect("cached");
    assert_eq!(fixture.server.fetches(), 1);
    fixture.clock.advance(Duration::from_secs(1));
    fixture.verify(&valid_token()).await.expect("refetched after max-age minus age");
    assert_eq!(fixture.server.fetches(), 2);
}

#[tokio::test]
async fn kid_rotated_out_after_max_age() {
    let fixture = Fixture::with(&[key_a()], "max-age=100", |_| {}).await;
    fixture.verify(&valid_token()).await.expect("key a while published");
    // Google drops key A and publishes B. Until max-age passes, A's tokens still verify.
    fixture.server.set_x509(&[key_b()]);
    fixture.clock.advance(Duration::from_secs(50));
    fixture.verify(&valid_token()).await.expect("key a still cached");
    fixture.clock.advance(Duration::from_secs(51));
    let result = fixture.verify(&valid_token()).await;
    assert!(matches!(result, Err(AuthError::UnknownKid { .. })), "{result:?}");
    fixture.verify(&rs256(key_b(), &claims())).await.expect("key b after rotation");
    assert_eq!(fixture.server.fetches(), 2);
}

#[tokio::test]
async fn key_server_down_with_empty_cache_is_503_not_panic() {
    let clock = ManualClock::at_secs(NOW);
    let (_, verifier) = verifier_for(dead_url().await, &clock, |_| {});
    let error = verifier.verify(&valid_token()).await.expect_err("no keys");
    assert!(matches!(error, AuthError::KeysUnavailable(_)), "{error:?}");
    assert_eq!(error.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error.code(), "keys-unavailable");
    assert!(error.to_string().contains("no public keys"), "{error}");
}

#[tokio::test]
async fn key_server_error_status_with_empty_cache_is_503() {
    let server = KeyServer::x509(&[key_a()], "max-age=100").await;
    server.set_up(false);
    let fixture = Fixture::over(server, KeysFormat::X509, |_| {});
    let error = fixture.verify(&valid_token()).await.expect_err("no keys");
    assert!(matches!(&error, AuthError::KeysUnavailable(m) if m.contains("500")), "{error:?}");
    // Back up: after the failure backoff (5 s) the next verification fetches and succeeds.
    fixture.server.set_up(true);
    let again = fixture.verify(&valid_token()).await;
    assert!(matches!(again, Err(AuthError::KeysUnavailable(_))), "inside backoff: {again:?}");
    assert_eq!(fixture.server.fetches(), 1, "no retry inside the backoff");
    fixture.clock.advance(Duration::from_secs(5));
    fixture.verify(&valid_token()).await.expect("after backoff");
    assert_eq!(fixture.server.fetches(), 2);
}

#[tokio::test]
async fn garbage_key_document_is_a_failed_fetch() {
    let server = KeyServer::start(json!({"kid-a": "not a certificate"}).to_string(), "max-age=100").await;
    let fixture = Fixture::over(server, KeysFormat::X509, |_| {});
    let result = fixture.verify(&valid_token()).await;
    assert!(matches!(&result, Err(AuthError::KeysUnavailable(m)) if m.contains("no usable RSA key")), "{result:?}");
}

#[tokio::test]
async fn stale_keys_kept_for_bounded_grace_when_refresh_fails() {
    let server = KeyServer::x509(&[key_a()], "max-age=100").await;
    let clock = ManualClock::at_secs(NOW);
    let (_, verifier) = verifier_for(server.url(), &clock, |o| o.stale_grace = Duration::from_secs(600));
    verifier.verify(&valid_token()).await.expect("fresh");
    server.set_up(false);
    clock.advance(Duration::from_secs(101));
    verifier.verify(&valid_token()).await.expect("stale but inside grace");
    assert_eq!(server.fetches(), 2, "the stale cache tried one refresh");
    clock.advance(Duration::from_secs(2));
    verifier.verify(&valid_token()).await.expect("inside grace, inside backoff: no fetch");
    assert_eq!(server.fetches(), 2);
    clock.set_secs(NOW + 100 + 600); // max-age + grace reached
    let result = verifier.verify(&valid_token()).await;
    assert!(matches!(result, Err(AuthError::KeysUnavailable(_))), "grace is bounded: {result:?}");
    // Once the key server recovers (and the failure backoff has passed), verification resumes.
    server.set_up(true);
    clock.advance(Duration::from_secs(5));
    let fresh = rs256(key_a(), &claims_with(&[("iat", json!(NOW + 700)), ("exp", json!(NOW + 4000))]));
    verifier.verify(&fresh).await.expect("recovered");
}

#[tokio::test]
async fn unknown_kids_cause_at_most_one_refresh_a_minute() {
    let fixture = Fixture::new().await; // max-age one hour
    fixture.verify(&valid_token()).await.expect("warm the cache");
    assert_eq!(fixture.server.fetches(), 1);

    let unknown = |i: usize| {
        jws(
            json!({"alg": "RS256", "kid": format!("kid-unknown-{i}")}),
            &claims(),
            &key_a().encoding,
            jsonwebtoken::Algorithm::RS256,
        )
    };
    // Inside the first minute after the fetch: no refresh at all.
    for i in 0..50 {
        let result = fixture.verify(&unknown(i)).await;
        assert!(matches!(result, Err(AuthError::UnknownKid { .. })), "{result:?}");
    }
    assert_eq!(fixture.server.fetches(), 1, "unknown kids inside the first minute");

    // A minute later, a burst of unknown kids, sequential then concurrent: one refresh.
    fixture.clock.advance(Duration::from_secs(60));
    for i in 50..100 {
        let _ = fixture.verify(&unknown(i)).await;
    }
    let burst = (100..200).map(|i| {
        let token = unknown(i);
        let verifier = &fixture.verifier;
        async move { verifier.verify(&token).await }
    });
    for result in futures_join_all(burst).await {
        assert!(matches!(result, Err(AuthError::UnknownKid { .. })), "{result:?}");
    }
    assert_eq!(fixture.server.fetches(), 2, "one refresh in the second minute");

    fixture.clock.advance(Duration::from_secs(59));
    let _ = fixture.verify(&unknown(300)).await;
    assert_eq!(fixture.server.fetches(), 2, "59 s later: still rate-limited");
    fixture.clock.advance(Duration::from_secs(1));
    let _ = fixture.verify(&unknown(301)).await;
    let _ = fixture.verify(&unknown(302)).await;
    assert_eq!(fixture.server.fetches(), 3, "one more after the minute");
    // Known kids were never disturbed.
    fixture.verify(&valid_token()).await.expect("known kid");
}

/// Poll futures concurrently on the current task (no dependency on the futures crate).
async fn futures_join_all<F: std::future::Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut pending: Vec<Option<std::pin::Pin<Box<F>>>> = futures.into_iter().map(|f| Some(Box::pin(f))).collect();
    let mut outputs = Vec::new();
    std::future::poll_fn(|cx| {
        for slot in pending.iter_mut() {
            if let Some(future) = slot
                && let std::task::Poll::Ready(output) = future.as_mut().poll(cx)
            {
                outputs.push(output);
                *slot = None;
            }
        }
        if pending.iter().all(Option::is_none) { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
    })
    .await;
    outputs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_verifications_cause_one_fetch() {
    let server = KeyServer::x509(&[key_a(), key_b()], "max-age=3600").await;
    // The key server answers slowly, so every verification arrives while the one fetch is in flight.
    server.set_delay(Duration::from_millis(300));
    let clock = ManualClock::at_secs(NOW);
    let (keys, verifier) = verifier_for(server.url(), &clock, |_| {});
    let verifier = Arc::new(verifier);
    let token_a = Arc::new(rs256(key_a(), &claims()));
    let token_b = Arc::new(rs256(key_b(), &claims_with(&[("sub", json!("bob"))])));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let verifier = verifier.clone();
        let token = if i % 2 == 0 { token_a.clone() } else { token_b.clone() };
        tasks.spawn(async move { verifier.verify(&token).await });
    }
    let mut ok = 0;
    while let Some(joined) = tasks.join_next().await {
        joined.expect("task").expect("verification");
        ok += 1;
    }
    assert_eq!(ok, 1000);
    assert_eq!(server.fetches(), 1, "single flight");
    assert_eq!(keys.fetch_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_verifications_with_server_down_make_one_attempt() {
    let server = KeyServer::x509(&[key_a()], "max-age=3600").await;
    server.set_up(false);
    server.set_delay(Duration::from_millis(200));
    let clock = ManualClock::at_secs(NOW);
    let (_, verifier) = verifier_for(server.url(), &clock, |_| {});
    let verifier = Arc::new(verifier);
    let token = Arc::new(valid_token());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let (verifier, token) = (verifier.clone(), token.clone());
        tasks.spawn(async move { verifier.verify(&token).await });
    }
    while let Some(joined) = tasks.join_next().await {
        let result = joined.expect("task");
        assert!(matches!(result, Err(AuthError::KeysUnavailable(_))), "{result:?}");
    }
    assert_eq!(server.fetches(), 1, "waiters share the failed attempt");
}

#[tokio::test]
async fn missing_max_age_uses_the_default_lifetime() {
    let server = KeyServer::x509(&[key_a()], "public").await;
    let clock = ManualClock::at_secs(NOW);
    let (_, verifier) = verifier_for(server.url(), &clock, |o| o.default_max_age = Duration::from_secs(60));
    verifier.verify(&valid_token()).await.expect("first");
    clock.advance(Duration::from_secs(59));
    verifier.verify(&valid_token()).await.expect("cached");
    assert_eq!(server.fetches(), 1);
    clock.advance(Duration::from_secs(1));
    verifier.verify(&valid_token()).await.expect("refetched");
    assert_eq!(server.fetches(), 2);
}

#[tokio::test]
async fn no_store_is_not_cached() {
    let server = KeyServer::x509(&[key_a()], "no-store").await;
    let clock = ManualClock::at_secs(NOW);
    let (_, verifier) = verifier_for(server.url(), &clock, |_| {});
    verifier.verify(&valid_token()).await.expect("first");
    verifier.verify(&valid_token()).await.expect("second");
    assert_eq!(server.fetches(), 2);
}

#[tokio::test]
async fn key_source_refuses_non_http_urls() {
    let clock = ManualClock::at_secs(NOW);
    for url in ["ftp://example.com/keys", "not a url", "/relative/keys"] {
        let result = KeySource::new(KeySourceOptions::new(url, KeysFormat::X509), clock.shared());
        assert!(result.is_err(), "{url} accepted");
    }
}
