#!/usr/bin/env node
// The real-browser test of the demo page: two headless Chromium instances against a running
// `encore serve`.
//
//   node tests/browser/demo.mjs https://127.0.0.1:8443 [--timeout 60] [--room NAME] [--wav FILE] [--screenshots DIR]
//
// Page A signs in (dev mode) as a speaker and presses Talk, publishing a speech WAV made with
// espeak-ng through Chromium's fake audio capture. Page B, another browser without that file, signs
// in as a listener and presses Listen. Success: B's getStats() shows inbound audio packets and
// totalAudioEnergy > 0 (audio really decoded and played by the <audio> element), and B's page
// showed one of A's utterances (`<A's peer>#<n>`) in #now-playing. B signs in as a moderator:
// it silences A's microphone from its page (A's mic button must be disabled with the reason shown)
// and lifts it again. Then, when ENCORE_RESTART_ACK names a file (the cargo test sets it), it
// prints `ACTION restart-server` and waits for the harness to restart the server and write that
// file: both pages must reconnect by themselves (A talking, B listening) and B hear A again.
// Then once more with the server's dev signing key gone (`ACTION restart-server-new-key`): the
// pages' tokens are refused, and they must get fresh ones and reconnect, still signed in.
// Then B's page is reloaded: it must come back signed in, in the room, listening, hearing A.
// Last, a third restart while A's ticket requests are answered 503 (A must keep trying, signed
// in), then 401 (a refused token, even fresh: A must sign out and say why).
// Exits 0 on success, 1 with the reason on failure, 2 on bad usage. Prints what it measured,
// and a last line `RESULT {json}`.
//
// Environment (scripts/browser-deps.sh prints these): CHROMIUM (default /usr/lib/chromium/chromium),
// PLAYWRIGHT_CORE (path of the playwright-core package, default: resolved from NODE_PATH),
// ESPEAK_NG, SOX (default: from PATH).

import { mkdirSync, readFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';

import {
  RATE, begin, chromiumPath, cleanUp, elapsed, exitWith, fail, hardStop, listenerFacts, load, log, makeSpeechWav, sleep,
  openChromiumPage as openPage, pageError, parseArgs, reportFailure, sendSideFacts, signInAndJoin,
  utterancesOf, waitFor, waitRecvConnected, waitSendConnected,
} from './common.mjs';

const { serverUrl, timeoutS, roomName, wav: wavArg, screenshots } = parseArgs({
  script: 'demo.mjs',
  usage: 'node tests/browser/demo.mjs SERVER_URL [--timeout SECONDS] [--room NAME] [--wav FILE] [--screenshots DIR]',
  timeoutS: 60,
  roomName: `browser-${process.pid}-${Date.now() % 100000}`,
  options: { '--wav': 'wav', '--screenshots': 'screenshots' },
});

// The speech WAV: two sentences, 1.5 s of silence around them.
const SENTENCES = [
  'Hello everyone, this is Encore, a server for time shifted speech.',
  'The quick brown fox jumps over the lazy dog, and everybody hears it.',
];
const GAP_S = 1.5;

async function clickAndCheck(p, selector, what) {
  await p.page.click(selector, { timeout: 10000 });
  // The page disables a button while its request runs; wait until it is answered.
  await waitFor(p, `${what} to be answered`, (sel) => {
    const el = document.querySelector(sel);
    return el && !el.disabled;
  }, selector, 10000);
  const error = await pageError(p.page);
  if (error) fail(`${p.label}: ${what}: the page shows an error: ${error}`);
}

// Which pages showed the reconnecting state within `timeoutMs` (polled: a quick restart may
// slip between two looks; the reconnect counter is what the test holds the pages to).
async function seenReconnecting(pages, timeoutMs, before) {
  const seen = new Set();
  const until = Date.now() + timeoutMs;
  while (seen.size < pages.length && Date.now() < until) {
    for (const [i, p] of pages.entries()) {
      const state = await p.page.evaluate(() => ({
        status: document.getElementById('status').dataset.state,
        banner: !document.getElementById('reconnecting').hidden,
        reconnects: window.encore.reconnects(),
      }));
      if ((state.status === 'reconnecting' && state.banner) || state.reconnects > before[i]) seen.add(p.label);
    }
    await sleep(100);
  }
  return [...seen];
}

// Waits until `p` decodes audio on its (new) receive transport and shows an utterance of `speaker`.
async function hearsAgain(p, speaker, timeoutMs) {
  const pattern = utterancesOf(speaker);
  const until = Date.now() + timeoutMs;
  let utterance = null;
  for (;;) {
    const facts = await listenerFacts(p.page);
    if (!utterance && pattern.test(facts.nowPlaying)) utterance = facts.nowPlaying;
    const audio = facts.stats && facts.stats.audio;
    if (audio && audio.packetsReceived > 0 && audio.totalAudioEnergy > 0 && facts.audioPlaying && utterance) {
      return { packets: audio.packetsReceived, energy: audio.totalAudioEnergy, utterance };
    }
    const error = await pageError(p.page);
    if (error) fail(`${p.label}: hearing ${speaker} again: the page shows an error: ${error}`);
    if (Date.now() > until) {
      fail(`${p.label}: did not hear ${speaker} again (${audio ? `${audio.packetsReceived} packets, energy ${audio.totalAudioEnergy}` : 'no inbound audio'}; now playing "${facts.nowPlayingText}")`);
    }
    await sleep(250);
  }
}

// -- main ----------------------------------------------------------------------------------------

async function main() {
  const { result, logs, work, opened, deadline, left } = begin('encore-browser-', { serverUrl, roomName, timeoutS });

  try {
    if (!existsSync(chromiumPath)) fail(`no chromium at ${chromiumPath} (run scripts/browser-deps.sh)`);
    const { chromium } = load('PLAYWRIGHT_CORE', 'playwright-core');

    let wav = wavArg;
    if (!wav) {
      const speech = makeSpeechWav(work, SENTENCES, GAP_S);
      wav = speech.wav;
      result.speech = speech.truth;
      log(`speech WAV: ${speech.total_s} s at ${RATE} Hz, sentences ${speech.truth.map((t) => `${(t.start_sample / RATE).toFixed(2)}-${(t.end_sample / RATE).toFixed(2)} s`).join(', ')}`);
    }

    const a = await openPage(chromium, 'A', wav, logs);
    opened.push(a);
    const b = await openPage(chromium, 'B', null, logs);
    opened.push(b);
    log(`browsers: ${a.browser.version()}`);

    const peerA = await signInAndJoin(a, { serverUrl, roomName, name: 'alice', role: 'speaker', timeoutMs: left() });
    const peerB = await signInAndJoin(b, { serverUrl, roomName, name: 'bob', role: 'moderator', timeoutMs: left() });
    result.peer_a = peerA;
    result.peer_b = peerB;

    // B sees A in the peer list.
    await waitFor(b, `peer ${peerA} in B's list`, (peer) => !!document.querySelector(`#peers li[data-peer="${CSS.escape(peer)}"]`), peerA, left());

    // B asks for video, and A talks with a camera (Chromium's fake one): B must see A's frames
    // with A's utterance.
    await b.page.check('#want-video');
    await b.page.click('#listen');
    await waitRecvConnected(b, 'the receive transport to connect', left());
    log('B: listening, receive transport connected');

    await a.page.check('#camera');
    await a.page.click('#talk');
    await waitSendConnected(a, 'the send transport to connect', left());
    const send = await sendSideFacts(a.page);
    result.send = send;
    log(`A: talking, send transport connected; offer has audio level: ${send.offerHasAudioLevel}, answer has it: ${send.answerHasAudioLevel}, codecs: ${send.answerCodecs.join(' ')}`);
    if (!send.offerHasAudioLevel) fail(`A's offer lacks the ${'urn:ietf:params:rtp-hdrext:ssrc-audio-level'} header extension`);
    if (!send.answerHasAudioLevel) fail('the server\'s answer did not negotiate the audio-level header extension');
    const talkAt = Date.now();

    // Now poll B until audio decoded and A's utterance shown as now playing.
    const pattern = utterancesOf(peerA);
    let sawNowPlaying = null;
    // B's peer list says A is speaking; A's own microphone meter moves.
    let sawSpeaking = false;
    let micLevel = 0;
    let videoFrames = 0;
    let heardBy = null; // A's page: how many hear A live
    let peerLevel = 0; // B's meter of A's level
    let last = null;
    let lastPrint = 0;
    for (;;) {
      last = await listenerFacts(b.page);
      if (!sawNowPlaying && pattern.test(last.nowPlaying)) {
        sawNowPlaying = { utterance: last.nowPlaying, text: last.nowPlayingText, live: last.nowLive, after_s: +((Date.now() - talkAt) / 1000).toFixed(2) };
        // Now playing in plain words: "alice, live" or "alice, 1.2 s behind".
        if (!last.nowPlayingText.startsWith(`${peerA}, `)) fail(`B: now playing reads "${last.nowPlayingText}", not "${peerA}, live" or "... behind"`);
        log(`B: now playing ${last.nowPlaying} (${last.nowLive}), ${sawNowPlaying.after_s} s after Talk`);
      }
      const audio = last.stats && last.stats.audio;
      if (Date.now() - lastPrint > 2000) {
        lastPrint = Date.now();
        log(`B: ${audio ? `${audio.packetsReceived} packets, energy ${audio.totalAudioEnergy.toFixed(4)}, level ${audio.audioLevel.toFixed(3)}` : 'no inbound audio yet'}; now playing "${last.nowPlayingText}"; audio element ${last.audioPlaying ? 'playing' : 'not playing'}`);
      }
      if (!sawSpeaking) sawSpeaking = await b.page.evaluate((sel) => !!document.querySelector(sel), `[data-testid="speaking-${peerA}"]`);
      if (!videoFrames) videoFrames = (last.stats && last.stats.video && last.stats.video.framesDecoded) || 0;
      if (!heardBy) heardBy = await a.page.evaluate(() => { const el = document.getElementById('audience'); return !el.hidden && /heard now by [1-9]\d* live/.test(el.textContent) ? el.textContent : null; });
      if (!peerLevel) peerLevel = await b.page.evaluate((sel) => { const m = document.querySelector(sel); return m ? +m.value : 0; }, `[data-testid="level-${peerA}"]`);
      if (!micLevel) micLevel = await a.page.evaluate(() => +(document.getElementById('mic-level').dataset.level || 0));
      if (audio && audio.packetsReceived > 0 && audio.totalAudioEnergy > 0 && last.audioPlaying && sawNowPlaying && sawSpeaking && micLevel > 0 && videoFrames > 0 && heardBy && peerLevel > 0) break;
      const error = (await pageError(b.page)) || (await pageError(a.page));
      if (error) fail(`a page shows an error: ${error}`);
      if (Date.now() > deadline) {
        const missing = [];
        if (!audio || !(audio.packetsReceived > 0)) missing.push('no inbound audio packets at B');
        else if (!(audio.totalAudioEnergy > 0)) missing.push(`B received ${audio.packetsReceived} packets but decoded no energy (totalAudioEnergy 0)`);
        if (!last.audioPlaying) missing.push('B\'s <audio> element is not playing');
        if (!sawNowPlaying) missing.push(`B never showed an utterance of ${peerA} as now playing (last: "${last.nowPlayingText}")`);
        if (!sawSpeaking) missing.push(`B's peer list never showed ${peerA} speaking`);
        if (!(micLevel > 0)) missing.push('A\'s microphone meter never moved');
        if (!(peerLevel > 0)) missing.push(`B's meter of ${peerA}'s level never moved`);
        if (!heardBy) missing.push('A\'s page never said a listener hears A live');
        if (!(videoFrames > 0)) missing.push(`B decoded no video frame of ${peerA}'s camera (${JSON.stringify(last.stats && last.stats.video)})`);
        const sendNow = await sendSideFacts(a.page).catch(() => null);
        if (sendNow) missing.push(`A sent ${sendNow.packetsSent} audio packets`);
        fail(`timeout after ${timeoutS} s: ${missing.join('; ')}`);
      }
      await sleep(250);
    }

    // The page's controls, against the real server: each must be answered ok (no error shown).
    await clickAndCheck(b, '#like', 'Like');
    const likeText = await b.page.textContent('#like');
    if (likeText !== 'Liked') fail(`B: the Like button reads "${likeText}" after a like, not "Liked"`);
    log(`A's microphone meter at ${micLevel}; B saw ${peerA} speaking and decoded ${videoFrames} frames of A's camera; B's Like shows "${likeText}"; A's page: "${heardBy}"; B's meter of A at ${peerLevel}`);
    result.video_frames = videoFrames;
    await clickAndCheck(b, `[data-testid="follow-${peerA}"]`, 'Follow');
    const pressed = await b.page.getAttribute(`[data-testid="follow-${peerA}"]`, 'aria-pressed');
    if (pressed !== 'true') fail(`B: the Follow toggle of ${peerA} is not pressed after the click`);
    // A pause of 1.5 s while A talks: B's position waits, and the stream resumes with the next
    // sequence number, so B's browser counts nothing lost (checked at the end).
    // While paused, A's next sentence waits for B: the page's "Up next" names it (the server's
    // up_next queue), in words.
    await clickAndCheck(b, '#pause-listen', 'Pause');
    const pausedAt = Date.now();
    const upNext = await waitFor(b, `"Up next" to name an utterance of ${peerA}`, (peer) => {
      const item = document.querySelector('#up-next li');
      const box = document.getElementById('up-next-box');
      return item && !box.hidden && item.dataset.utterance.startsWith(`${peer}#`)
        ? { utterance: item.dataset.utterance, reason: item.dataset.reason, text: item.textContent }
        : null;
    }, peerA, 12000);
    if (!upNext.text.startsWith(`${peerA}, `)) fail(`B: "Up next" reads "${upNext.text}", not "${peerA}, ..."`);
    result.up_next = upNext;
    await sleep(Math.max(0, 1500 - (Date.now() - pausedAt)));
    const pausedFor = ((Date.now() - pausedAt) / 1000).toFixed(1);
    await clickAndCheck(b, '#pause-listen', 'Resume');
    log(`B: Like, Follow, Pause (${pausedFor} s; up next: "${upNext.text}") and Resume answered ok`);

    // Moderation from the page: B silences A's microphone; A's page disables its mic button and
    // says why; B lifts the mute from its page; A's button works again.
    await b.page.click(`[data-testid="mute-peer-${peerA}"]`, { timeout: 10000 });
    await waitFor(a, 'the mic button held by the moderator, with the reason', () => {
      const held = document.getElementById('mic-held');
      return !held.hidden && document.getElementById('mute-mic').disabled && held.textContent.includes('moderator');
    }, null, 10000);
    await waitFor(b, `${peerA} shown as muted, with a way to lift it`, (peer) => !!document.querySelector(`[data-testid="unmute-peer-${CSS.escape(peer)}"]`), peerA, 10000);
    result.moderation = { held: (await a.page.textContent('#mic-held')).trim() };
    log(`A: "${result.moderation.held}"`);
    await b.page.click(`[data-testid="unmute-peer-${peerA}"]`, { timeout: 10000 });
    await waitFor(a, 'the mic button free again', () => document.getElementById('mic-held').hidden && !document.getElementById('mute-mic').disabled, null, 10000);
    log('B muted A and lifted it from its page; A\'s page followed');

    // Measured, not asserted: the first utterance's length as the server saw it, against the
    // WAV's ground truth (the fake capture starts somewhere in the loop, so it may be cut).
    const endBy = Math.min(deadline, Date.now() + 12000);
    let ended = null;
    while (!ended && Date.now() < endBy) {
      ended = await b.page.evaluate((u) => {
        const x = window.encore.room().utterances.find((v) => v.utterance === u && v.duration_ms !== undefined);
        return x ? { utterance: x.utterance, duration_ms: x.duration_ms, reason: x.reason } : null;
      }, sawNowPlaying.utterance);
      if (!ended) await sleep(250);
    }
    result.first_utterance = ended;
    if (ended) {
      const truth = (result.speech || []).map((t) => `${t.seconds} s`).join(', ');
      log(`B: ${ended.utterance} ended after ${(ended.duration_ms / 1000).toFixed(2)} s (${typeof ended.reason === 'string' ? ended.reason : JSON.stringify(ended.reason)}); the WAV's sentences last ${truth || '?'}`);
    }

    // The stage: B raises a hand, a moderator (page M) invites B, B accepts and talks, the
    // moderator moves B back to the audience: B's talking ends and Talk is off again.
    const m = await openPage(chromium, 'M', null, logs);
    opened.push(m);
    await signInAndJoin(m, { serverUrl, roomName, name: 'mo', role: 'moderator', timeoutMs: left() });
    const byTestId = (id) => `[data-testid="${id}"]`;
    await clickAndCheck(b, '#raise-hand', 'Raise hand');
    await waitFor(m, `${peerB}'s raised hand`, (sel) => !!document.querySelector(sel), byTestId(`hand-${peerB}`), left());
    await clickAndCheck(m, byTestId(`invite-${peerB}`), 'Invite to speak');
    await waitFor(b, 'the invitation', () => !document.getElementById('invitation').hidden, null, left());
    await clickAndCheck(b, '#accept-invite', 'Accept');
    await waitFor(b, 'Talk to be allowed', () => !document.getElementById('talk').disabled, null, left());
    await b.page.click('#talk');
    await waitSendConnected(b, 'B\'s send transport to connect', left());
    await waitFor(m, `${peerB} publishing`, (sel) => !!document.querySelector(sel), byTestId(`publishing-${peerB}`), left());
    // The button goes when B leaves the stage: wait for its effect, not for the button.
    await m.page.click(byTestId(`move-to-audience-${peerB}`), { timeout: 10000 });
    await waitFor(b, 'B back in the audience', () => !window.encore.sendPc && document.getElementById('talk').disabled, null, left());
    const note = await b.page.textContent('#stage-note');
    log(`stage: B raised a hand, M invited, B accepted and talked, M moved B back to the audience ("${note}")`);
    result.stage = true;
    // A phone (390 x 844): what plays now is above the fold.
    await b.page.setViewportSize({ width: 390, height: 844 });
    await b.page.evaluate(() => window.scrollTo(0, 0));
    const nowBox = await b.page.locator('#now-playing').boundingBox();
    if (!nowBox || nowBox.y + nowBox.height > 844) fail(`B on a 390x844 screen: now playing is at ${JSON.stringify(nowBox)}, below the fold`);
    if (screenshots) {
      mkdirSync(screenshots, { recursive: true });
      await b.page.screenshot({ path: join(screenshots, 'B-phone.png') });
    }
    result.phone_now_playing_y = Math.round(nowBox.y);
    log(`B on a 390x844 screen: now playing at y=${Math.round(nowBox.y)}`);
    // The address bar and the room's link share the room.
    const link = await b.page.evaluate(() => ({ href: document.getElementById('room-link').href, search: location.search }));
    if (!link.href.endsWith(`/?room=${roomName}`) || link.search !== `?room=${roomName}`) fail(`B: the room link is ${JSON.stringify(link)}`);

    last = await listenerFacts(b.page);
    const sendEnd = await sendSideFacts(a.page);

    // A restart under both pages: they reconnect by themselves, and B hears A again.
    const ack = process.env.ENCORE_RESTART_ACK;
    if (ack) {
      // Asks the harness for restart number `n` and waits for it; then both pages must have
      // reconnected by themselves, A talking and B listening again.
      const restart = async (action, n) => {
        const before = await Promise.all([a, b].map((p) => p.page.evaluate(() => window.encore.reconnects())));
        console.log(`ACTION ${action}`);
        const seen = await seenReconnecting([a, b], 15000, before);
        log(`the pages showed they were reconnecting: ${seen.join(', ') || 'neither (the restart was quicker than a look)'}`);
        const acked = () => existsSync(ack) && readFileSync(ack, 'utf8').split('\n').filter(Boolean).length >= n;
        while (!acked()) {
          if (Date.now() > deadline) fail(`the harness did not ${action} in time`);
          await sleep(200);
        }
        for (const [i, p] of [a, b].entries()) {
          await waitFor(p, `a reconnect by itself (${action})`, (was) => window.encore.reconnects() > was && document.getElementById('status').dataset.state === 'joined', before[i], left());
        }
        await waitSendConnected(a, 'talking again', left());
        await waitRecvConnected(b, 'listening again', left());
        return seen;
      };

      const restartAt = Date.now();
      const reconnectingSeen = await restart('restart-server', 1);
      const again = await hearsAgain(b, await a.page.textContent('#my-peer'), left());
      result.reconnected = { ...again, heard_again_after_s: +((Date.now() - restartAt) / 1000).toFixed(2), seen_reconnecting: reconnectingSeen };
      log(`B hears A again after the restart: ${again.packets} packets, now playing ${again.utterance}`);

      // A new signing key: every token the pages hold is refused (401 on the ticket); they get
      // fresh ones and carry on, signed in as before.
      const keyAt = Date.now();
      const tokensBefore = await Promise.all([a, b].map((p) => p.page.evaluate(() => window.encore.auth().expiresAt)));
      await restart('restart-server-new-key', 2);
      const signedIn = await Promise.all([a, b].map((p) => p.page.evaluate(() => window.encore.auth().uid)));
      if (signedIn[0] !== 'alice' || signedIn[1] !== 'bob') fail(`the pages are signed in as ${signedIn.join(', ')} after the key changed`);
      const tokensAfter = await Promise.all([a, b].map((p) => p.page.evaluate(() => window.encore.auth().expiresAt)));
      if (!tokensAfter.every((t, i) => t > tokensBefore[i])) fail('the pages reconnected after the key changed without a fresh token: was the old one not refused?');
      const afterKey = await hearsAgain(b, await a.page.textContent('#my-peer'), left());
      result.new_key = { ...afterKey, heard_again_after_s: +((Date.now() - keyAt) / 1000).toFixed(2), signed_in_as: signedIn.join(', ') };
      log(`after a new signing key, still signed in as ${signedIn.join(', ')}; B hears A again: ${afterKey.packets} packets`);

      // A reload keeps B signed in and puts it back in its room, listening.
      const reloadAt = Date.now();
      await b.page.reload({ waitUntil: 'load', timeout: left() });
      await waitFor(b, 'back in the room after a reload', () => document.getElementById('status').dataset.state === 'joined', null, left());
      await waitRecvConnected(b, 'listening after a reload', left());
      const reloaded = await hearsAgain(b, await a.page.textContent('#my-peer'), left());
      result.reloaded = { ...reloaded, heard_again_after_s: +((Date.now() - reloadAt) / 1000).toFixed(2), whoami: (await b.page.textContent('#whoami')).trim() };
      log(`B, reloaded, is ${result.reloaded.whoami} and hears A again: ${reloaded.packets} packets, now playing ${reloaded.utterance}`);

      // Signing out is for a refused token only: a server that answers 503 is waited out; one
      // that refuses the token (401), a fresh one too, signs the page out.
      const ticketAnswer = { status: 503, code: 'keys-unavailable' };
      await a.page.route('**/api/ws-ticket', (route) => route.fulfill({
        status: ticketAnswer.status,
        contentType: 'application/json',
        body: JSON.stringify({ error: { code: ticketAnswer.code, message: `the test answers ${ticketAnswer.status}` } }),
      }));
      console.log('ACTION restart-server');
      const unavailableUntil = Date.now() + 5000;
      while (Date.now() < unavailableUntil) {
        const state = await a.page.evaluate(() => ({ status: document.getElementById('status').dataset.state, uid: window.encore.auth().uid }));
        if (state.uid !== 'alice' || state.status === 'signed-out') fail(`A signed out while the server answered 503 (${JSON.stringify(state)})`);
        await sleep(250);
      }
      ticketAnswer.status = 401;
      ticketAnswer.code = 'argument-error';
      const signedOut = Date.now() + 30000;
      let outState = null;
      for (;;) {
        outState = await a.page.evaluate(() => ({
          status: document.getElementById('status').dataset.state,
          uid: window.encore.auth().uid,
          signinShown: !document.getElementById('signin').hidden,
          error: document.getElementById('error').hidden ? null : document.getElementById('error-text').textContent,
          kept: localStorage.getItem('encore.session'),
        }));
        if (outState.status === 'signed-out' && !outState.uid) break;
        if (Date.now() > signedOut) fail(`A did not sign out when its token was refused (${JSON.stringify(outState)})`);
        await sleep(250);
      }
      if (!outState.signinShown || !outState.error || !outState.error.includes('refused') || outState.kept) {
        fail(`A signed out, but not cleanly: ${JSON.stringify(outState)}`);
      }
      result.refused = { error: outState.error };
      log(`A kept trying through 503s, then signed out on 401: "${outState.error}"`);
      await waitFor(b, 'B back after the third restart', () => document.getElementById('status').dataset.state === 'joined', null, left());
    } else {
      log('ENCORE_RESTART_ACK is not set: the restart and reload part is skipped');
    }

    result.ok = true;
    result.now_playing = sawNowPlaying;
    result.inbound_audio = last.stats.audio;
    result.outbound_audio_packets = sendEnd.packetsSent;
    result.utterances_seen = last.utterances;
    result.elapsed_s = +elapsed();
    const au = last.stats.audio;
    if (au.packetsLost !== 0) fail(`B's browser counts ${au.packetsLost} audio packets lost (after a pause and resume: a gap in the stream)`);
    log(`PASS: B received ${au.packetsReceived} audio packets (${au.packetsLost} lost), totalAudioEnergy ${au.totalAudioEnergy.toFixed(4)}, ` +
      `${au.totalSamplesReceived} samples (${au.concealedSamples} concealed); A sent ${sendEnd.packetsSent}; B showed ${sawNowPlaying.utterance} as now playing ` +
      `${sawNowPlaying.after_s} s after Talk; utterances seen: ${last.utterances.join(', ')}`);
  } catch (error) {
    reportFailure(result, error, logs, 80);
  } finally {
    if (screenshots) {
      mkdirSync(screenshots, { recursive: true });
      for (const p of opened) {
        await p.page.screenshot({ path: join(screenshots, `${p.label}.png`), fullPage: true }).catch(() => {});
      }
    }
    await cleanUp(opened, work);
  }
  exitWith(result);
}

hardStop(timeoutS);
main();
