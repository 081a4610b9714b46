#!/usr/bin/env node
// The cross-browser test of the demo page: headless Chromium (playwright-core) and headless Firefox
// (Debian's firefox-esr, driven by puppeteer-core over WebDriver BiDi) in one room of a running
// `encore serve`.
//
//   node tests/browser/firefox.mjs https://127.0.0.1:8443 [--timeout 90] [--room NAME]
//
// Both pages sign in (dev mode) as speakers, join the room and press Listen. Chromium talks (a
// speech WAV made with espeak-ng, through its fake audio capture) and Firefox must hear it: its
// getStats() inbound-rtp audio packets and bytes rising (a second of audio) with totalAudioEnergy
// > 0, its <audio> element playing, its page showing one of Chromium's utterances as now playing and
// its meter of Chromium moving. Then Chromium stops, Firefox talks (its fake microphone, a tone)
// and Chromium must hear it the same way. The utterance shown as now playing is the server's voice
// detection at work: it opens one only on voiced packets (the RFC 6464 level in the audio-level
// header extension at most 50). Firefox's fake tone arrives at level ~23 (-23 dBov; the page's
// meter shows 127 - level, ~104), so it is speech to the server as it is.
// Exits 0 on success, 1 with the reason on failure, 2 on bad usage; the last line is `RESULT {json}`.
// The browsers' own output (Firefox's through puppeteer's dumpio, Chromium's through playwright's
// DEBUG=pw:browser) goes to this script's stderr as it comes; the pages' consoles are printed on
// failure.
//
// Environment (scripts/browser-deps.sh prints these): CHROMIUM, PLAYWRIGHT_CORE, FIREFOX,
// PUPPETEER_CORE, ESPEAK_NG, SOX.

import { existsSync } from 'node:fs';

import {
  begin, chromiumPath, cleanUp, elapsed, exitWith, fail, hardStop, listenerFacts, load, log, makeSpeechWav,
  openChromiumPage, pageError, parseArgs, reportFailure, sendSideFacts, signInAndJoin, sleep, utterancesOf,
  waitFor, waitRecvConnected, waitSendConnected,
} from './common.mjs';

const { serverUrl, timeoutS, roomName } = parseArgs({
  script: 'firefox.mjs',
  usage: 'node tests/browser/firefox.mjs SERVER_URL [--timeout SECONDS] [--room NAME]',
  timeoutS: 90,
  roomName: `firefox-${process.pid}-${Date.now() % 100000}`,
});

const firefoxPath = process.env.FIREFOX || '/usr/lib/firefox-esr/firefox-esr';

// Chromium's microphone: one espeak-ng sentence between 1 s silences.
const SENTENCE = 'Hello from Chromium, this is Encore, and Firefox hears it.';

// -- browsers ------------------------------------------------------------------------------------

async function openChromium(wav, logs) {
  // Chromium's own stdout/stderr, on this script's stderr (playwright's `logger` option no longer
  // gets them); read by playwright's `debug` when it loads, so set before.
  if (!process.env.DEBUG) process.env.DEBUG = 'pw:browser';
  const { chromium } = load('PLAYWRIGHT_CORE', 'playwright-core');
  const p = await openChromiumPage(chromium, 'chromium', wav, logs);
  return { ...p, version: p.browser.version() };
}

// What Firefox needs here, found by leaving each out (Firefox 140 ESR, Linux):
// - media.navigator.streams.fake: getUserMedia gets Firefox's fake devices (there is no sound card;
//   the fake microphone is a steady 1 kHz tone), and media.navigator.permission.disabled: without
//   it getUserMedia waits on a permission prompt nobody answers, and Talk never connects.
// Not needed, so not set (the fewer prefs, the closer to the Firefox people run):
// - media.peerconnection.ice.loopback: the server's only host candidate is 127.0.0.1 and Firefox
//   gathers no loopback candidate, but Linux carries a datagram from Firefox's socket on the host's
//   own address (eth0) to 127.0.0.1 over lo, and the server answers the address it came from. On a
//   host with no interface but lo (a network namespace of its own) ICE fails for Firefox with or
//   without this pref (and media.peerconnection.ice.obfuscate_host_addresses=false), and for
//   Chromium too: the test needs a host with a network interface, as the Chromium test does.
// - media.peerconnection.ice.obfuscate_host_addresses: the listener's host candidates are mDNS
//   names (.local) the server cannot resolve, but the server learns Firefox's address from its
//   connectivity checks (a peer-reflexive candidate), as with Chromium.
// - media.autoplay.default: the Listen click is a real click (WebDriver BiDi input), so the page
//   may play the remote audio, as it may for a user.
const FIREFOX_PREFS = {
  'media.navigator.streams.fake': true,
  'media.navigator.permission.disabled': true,
};

async function openFirefox(logs) {
  const puppeteer = load('PUPPETEER_CORE', 'puppeteer-core');
  const browser = await puppeteer.launch({
    browser: 'firefox',
    protocol: 'webDriverBiDi',
    executablePath: firefoxPath,
    headless: true,
    acceptInsecureCerts: true,
    extraPrefsFirefox: FIREFOX_PREFS,
    // Firefox's stdout/stderr go to this script's own (the test's failure output shows them).
    dumpio: true,
    timeout: 30000,
    protocolTimeout: 30000,
  });
  const page = await browser.newPage();
  page.on('console', (msg) => logs.push(`[firefox console.${msg.type()}] ${msg.text()}`));
  page.on('pageerror', (error) => logs.push(`[firefox pageerror] ${error.message}`));
  return { label: 'firefox', browser, page, version: await browser.version() };
}

// -- the page ------------------------------------------------------------------------------------
// Only what both drivers share: page.evaluate(fn, arg), page.click(selector), page.goto(url).

async function signInAndJoinAsSpeaker(p, name, timeoutMs) {
  return signInAndJoin(p, { serverUrl, roomName, name, role: 'speaker', timeoutMs });
}

async function listen(p, timeoutMs) {
  await p.page.click('#listen');
  await waitRecvConnected(p, 'the receive transport to connect', timeoutMs);
}

async function talk(p, timeoutMs) {
  await p.page.click('#talk');
  await waitSendConnected(p, 'the send transport to connect', timeoutMs);
  return sendSideFacts(p.page);
}

async function packetsSent(p) {
  const facts = await sendSideFacts(p.page);
  return facts ? facts.packetsSent : 0;
}

// A second of Opus at 20 ms a packet: how far inbound packets must rise after the first look.
const RISE_PACKETS = 50;

// Waits until `p` really hears `speaker`: inbound audio packets rising by RISE_PACKETS (and bytes
// with them) after the first look, decoded audio energy (totalAudioEnergy > 0: both browsers report
// it), the <audio> element playing, an utterance of `speaker` shown as now playing, and `p`'s meter
// of `speaker` (the server's levels notice) moving. Returns what it saw.
async function hears(p, speaker, timeoutMs) {
  const pattern = utterancesOf(speaker);
  const since = Date.now();
  const until = since + timeoutMs;
  let first = null;
  let utterance = null;
  let level = 0;
  let lastPrint = 0;
  for (;;) {
    const facts = await listenerFacts(p.page, speaker);
    const audio = facts.stats && facts.stats.audio;
    if (!utterance && pattern.test(facts.nowPlaying)) {
      utterance = { utterance: facts.nowPlaying, text: facts.nowPlayingText, after_s: +((Date.now() - since) / 1000).toFixed(2) };
      log(`${p.label}: now playing ${facts.nowPlaying} ("${facts.nowPlayingText}"), ${utterance.after_s} s after ${speaker} began`);
    }
    level = Math.max(level, facts.level);
    if (audio && audio.packetsReceived > 0 && !first) first = { ...audio, at: Date.now() };
    const rising = !!(first && audio && audio.packetsReceived >= first.packetsReceived + RISE_PACKETS && audio.bytesReceived > first.bytesReceived);
    if (Date.now() - lastPrint > 2000) {
      lastPrint = Date.now();
      log(`${p.label}: ${audio ? `${audio.packetsReceived} packets, ${audio.bytesReceived} bytes, energy ${audio.totalAudioEnergy.toFixed(4)}` : 'no inbound audio yet'}; now playing "${facts.nowPlayingText}"; audio element ${facts.audioPlaying ? 'playing' : 'not playing'}; meter of ${speaker} ${facts.level}`);
    }
    if (rising && facts.audioPlaying && utterance && audio.totalAudioEnergy > 0 && level > 0) {
      return { first: { packets: first.packetsReceived, bytes: first.bytesReceived }, audio, now_playing: utterance, max_level: level };
    }
    const error = await pageError(p.page);
    if (error) fail(`${p.label}: hearing ${speaker}: the page shows an error: ${error}`);
    if (Date.now() > until) {
      const missing = [];
      if (!audio || !(audio.packetsReceived > 0)) missing.push('no inbound audio packets');
      else if (!rising) missing.push(`inbound audio did not rise by ${RISE_PACKETS} packets (first ${first.packetsReceived} packets, ${first.bytesReceived} bytes; now ${audio.packetsReceived}, ${audio.bytesReceived})`);
      else if (!(audio.totalAudioEnergy > 0)) missing.push(`${audio.packetsReceived} packets but no decoded energy`);
      if (!facts.audioPlaying) missing.push('the <audio> element is not playing');
      if (!utterance) missing.push(`never showed an utterance of ${speaker} as now playing (last: "${facts.nowPlayingText}")`);
      if (!(level > 0)) missing.push(`its meter of ${speaker}'s level never moved`);
      fail(`${p.label} did not hear ${speaker}: ${missing.join('; ')}`);
    }
    await sleep(250);
  }
}

// -- main ----------------------------------------------------------------------------------------

async function main() {
  const { result, logs, work, opened, left } = begin('encore-firefox-', { serverUrl, roomName, timeoutS });
  try {
    for (const [what, path] of [['chromium', chromiumPath], ['firefox', firefoxPath]]) {
      if (!existsSync(path)) fail(`no ${what} at ${path} (run scripts/browser-deps.sh)`);
    }
    const { wav } = makeSpeechWav(work, [SENTENCE], 1);
    const c = await openChromium(wav, logs);
    opened.push(c);
    const f = await openFirefox(logs);
    opened.push(f);
    result.chromium = c.version;
    result.firefox = f.version;
    log(`browsers: Chromium ${c.version}, ${f.version} (WebDriver BiDi)`);

    const peerC = await signInAndJoinAsSpeaker(c, 'chrome', left());
    const peerF = await signInAndJoinAsSpeaker(f, 'fox', left());
    result.peer_chromium = peerC;
    result.peer_firefox = peerF;
    await listen(c, left());
    await listen(f, left());
    log('both listening, receive transports connected');

    // Chromium talks, Firefox listens.
    const cSend = await talk(c, left());
    log(`chromium: talking; codecs ${cSend.answerCodecs.join(' ')}`);
    const fHeard = await hears(f, peerC, left());
    result.firefox_hears_chromium = { ...fHeard, chromium_sent: await packetsSent(c) };
    log(`firefox heard chromium: ${fHeard.audio.packetsReceived} packets, ${fHeard.audio.bytesReceived} bytes (from ${fHeard.first.packets}, ${fHeard.first.bytes}), energy ${fHeard.audio.totalAudioEnergy}`);

    // The other way round: Chromium stops, Firefox talks with its fake microphone.
    await c.page.click('#stop-talk');
    await waitFor(c, 'talking to stop', () => !window.encore.sendPc, null, left());
    const fSend = await talk(f, left());
    result.firefox_send = fSend;
    log(`firefox: talking; offer has audio level: ${fSend.offerHasAudioLevel}, answer has it: ${fSend.answerHasAudioLevel}, codecs ${fSend.answerCodecs.join(' ')}`);
    if (!fSend.offerHasAudioLevel) fail('Firefox\'s offer lacks the audio-level header extension');
    if (!fSend.answerHasAudioLevel) fail('the server\'s answer to Firefox did not negotiate the audio-level header extension');
    const cHeard = await hears(c, peerF, left());
    result.chromium_hears_firefox = { ...cHeard, firefox_sent: await packetsSent(f) };
    log(`chromium heard firefox: ${cHeard.audio.packetsReceived} packets, ${cHeard.audio.bytesReceived} bytes, energy ${cHeard.audio.totalAudioEnergy.toFixed(4)}; its meter of firefox reached ${cHeard.max_level}`);

    result.ok = true;
    result.elapsed_s = +elapsed();
    log(`PASS in ${elapsed()} s`);
  } catch (error) {
    reportFailure(result, error, logs, 150);
  } finally {
    await cleanUp(opened, work);
  }
  exitWith(result);
}

hardStop(timeoutS);
main();
