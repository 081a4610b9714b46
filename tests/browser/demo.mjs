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
// showed one of A's utterances (`<A's peer>#<n>`) in #now-playing. Exits 0 on success, 1 with the
// reason on failure, 2 on bad usage. Prints what it measured, and a last line `RESULT {json}`.
//
// Environment (scripts/browser-deps.sh prints these): CHROMIUM (default /usr/lib/chromium/chromium),
// PLAYWRIGHT_CORE (path of the playwright-core package, default: resolved from NODE_PATH),
// ESPEAK_NG, SOX (default: from PATH).

import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const require = createRequire(import.meta.url);

// -- arguments -----------------------------------------------------------------------------------

function usage(message) {
  if (message) console.error(`demo.mjs: ${message}`);
  console.error('usage: node tests/browser/demo.mjs SERVER_URL [--timeout SECONDS] [--room NAME] [--wav FILE] [--screenshots DIR]');
  process.exit(2);
}

const args = process.argv.slice(2);
let serverUrl = null;
let timeoutS = 60;
let roomName = `browser-${process.pid}-${Date.now() % 100000}`;
let wavArg = null;
let screenshots = null;
for (let i = 0; i < args.length; i++) {
  const a = args[i];
  if (a === '--timeout') timeoutS = Number(args[++i]);
  else if (a === '--room') roomName = args[++i];
  else if (a === '--wav') wavArg = args[++i];
  else if (a === '--screenshots') screenshots = args[++i];
  else if (a === '-h' || a === '--help') usage();
  else if (a.startsWith('--')) usage(`unknown option ${a}`);
  else if (serverUrl === null) serverUrl = a;
  else usage(`unexpected argument ${a}`);
}
if (!serverUrl) usage('missing SERVER_URL');
if (!(timeoutS > 0)) usage('--timeout must be a positive number of seconds');
serverUrl = serverUrl.replace(/\/+$/, '');

const chromiumPath = process.env.CHROMIUM || '/usr/lib/chromium/chromium';
const espeak = process.env.ESPEAK_NG || 'espeak-ng';
const sox = process.env.SOX || 'sox';

const started = Date.now();
const elapsed = () => ((Date.now() - started) / 1000).toFixed(1);
const log = (...parts) => console.log(`[demo ${elapsed()}s]`, ...parts);

class Failure extends Error {}
const fail = (message) => {
  throw new Failure(message);
};

// -- the speech WAV ------------------------------------------------------------------------------
// FIELD-NOTES "Speech with exact ground truth": each sentence synthesized by espeak-ng, resampled to
// 48 kHz mono 16-bit with sox and trimmed of its silences, joined with 1.5 s silences, so the
// speech boundaries are known to the sample.

const SENTENCES = [
  'Hello everyone, this is Encore, a server for time shifted speech.',
  'The quick brown fox jumps over the lazy dog, and everybody hears it.',
];
const GAP_S = 1.5;
const RATE = 48000;

function run(cmd, cmdArgs) {
  const r = spawnSync(cmd, cmdArgs, { encoding: 'utf8' });
  if (r.error) fail(`${cmd} could not run: ${r.error.message} (run scripts/browser-deps.sh)`);
  if (r.status !== 0) fail(`${cmd} ${cmdArgs.join(' ')} failed (${r.status}): ${r.stderr.trim()}`);
  return r.stdout;
}

function samplesOf(file) {
  return Number(run(sox, ['--i', '-s', file]).trim());
}

function makeSpeechWav(dir) {
  const parts = [];
  const gap = join(dir, 'gap.wav');
  run(sox, ['-n', '-r', String(RATE), '-c', '1', '-b', '16', gap, 'trim', '0', String(GAP_S)]);
  parts.push(gap);
  const truth = [];
  let at = samplesOf(gap);
  SENTENCES.forEach((text, i) => {
    const raw = join(dir, `s${i}-raw.wav`);
    const out = join(dir, `s${i}.wav`);
    run(espeak, ['-v', 'en-us', '-s', '150', '-w', raw, text]);
    // Trim leading and trailing silence (below 0.1 % for 10 ms), then resample.
    run(sox, [raw, '-r', String(RATE), '-c', '1', '-b', '16', out,
      'silence', '1', '0.01', '0.1%', 'reverse', 'silence', '1', '0.01', '0.1%', 'reverse']);
    const n = samplesOf(out);
    truth.push({ sentence: i, start_sample: at, end_sample: at + n, seconds: +(n / RATE).toFixed(3) });
    at += n + samplesOf(gap);
    parts.push(out, gap);
  });
  const wav = join(dir, 'speech.wav');
  run(sox, [...parts, wav]);
  return { wav, truth, total_s: +(samplesOf(wav) / RATE).toFixed(3) };
}

// -- browsers ------------------------------------------------------------------------------------

function loadPlaywright() {
  const where = process.env.PLAYWRIGHT_CORE || 'playwright-core';
  try {
    return require(where);
  } catch (error) {
    fail(`cannot load playwright-core from ${where}: ${error.message} (run scripts/browser-deps.sh and set PLAYWRIGHT_CORE)`);
  }
}

function chromiumArgs(fakeAudioFile) {
  const a = [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--use-fake-ui-for-media-stream',
    '--use-fake-device-for-media-stream',
    '--autoplay-policy=no-user-gesture-required',
    '--ignore-certificate-errors',
  ];
  if (fakeAudioFile) a.push(`--use-file-for-fake-audio-capture=${fakeAudioFile}`);
  return a;
}

async function openPage(chromium, label, fakeAudioFile, logs) {
  const browser = await chromium.launch({
    executablePath: chromiumPath,
    headless: true, // playwright adds --headless
    args: chromiumArgs(fakeAudioFile),
    // playwright's --mute-audio keeps inbound audioLevel and totalAudioEnergy at 0
    ignoreDefaultArgs: ['--mute-audio'],
    timeout: 30000,
  });
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  const page = await context.newPage();
  page.on('console', (msg) => logs.push(`[${label} console.${msg.type()}] ${msg.text()}`));
  page.on('pageerror', (error) => logs.push(`[${label} pageerror] ${error.message}`));
  page.on('requestfailed', (req) => logs.push(`[${label} requestfailed] ${req.method()} ${req.url().split('?')[0]}: ${req.failure() && req.failure().errorText}`));
  page.on('websocket', (ws) => {
    logs.push(`[${label} websocket] open ${ws.url().split('?')[0]}`);
    ws.on('close', () => logs.push(`[${label} websocket] closed`));
  });
  return { browser, context, page, label };
}

async function pageError(page) {
  return page.evaluate(() => {
    const el = document.getElementById('error');
    return el && !el.hidden ? document.getElementById('error-text').textContent.trim() : null;
  });
}

// Waits for `predicate` in the page, failing early with the page's own error display.
async function waitFor(p, what, fn, arg, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await p.page.evaluate(fn, arg);
    if (value) return value;
    const error = await pageError(p.page);
    if (error) fail(`${p.label}: ${what}: the page shows an error: ${error}`);
    if (Date.now() > deadline) {
      const status = await p.page.evaluate(() => document.getElementById('status').textContent);
      fail(`${p.label}: ${what}: not within ${timeoutMs / 1000} s (status: "${status}")`);
    }
    await new Promise((r) => setTimeout(r, 200));
  }
}

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

async function signInAndJoin(p, name, role, timeoutMs) {
  const response = await p.page.goto(`${serverUrl}/`, { waitUntil: 'load', timeout: timeoutMs });
  if (!response || !response.ok()) fail(`${p.label}: GET / answered ${response ? response.status() : 'nothing'}`);
  await waitFor(p, 'the dev sign-in form', () => {
    const f = document.getElementById('dev-form');
    return f && !f.hidden;
  }, null, timeoutMs);
  await p.page.fill('#dev-name', name);
  await p.page.selectOption('#dev-role', role);
  await p.page.click('#dev-signin');
  await waitFor(p, 'sign-in', () => document.getElementById('status').dataset.state === 'signed-in', null, timeoutMs);
  await p.page.fill('#room', roomName);
  await p.page.click('#join');
  await waitFor(p, `joining room ${roomName}`, () => document.getElementById('status').dataset.state === 'joined', null, timeoutMs);
  const peer = await p.page.textContent('#my-peer');
  log(`${p.label}: signed in as ${name} (${role}), joined ${roomName} as peer "${peer}"`);
  return peer;
}

async function sendSideFacts(page) {
  return page.evaluate(async () => {
    const pc = window.encore.sendPc;
    if (!pc) return null;
    let packetsSent = 0;
    const stats = await pc.getStats();
    stats.forEach((s) => {
      if (s.type === 'outbound-rtp' && s.kind === 'audio') packetsSent += s.packetsSent || 0;
    });
    const uri = 'urn:ietf:params:rtp-hdrext:ssrc-audio-level';
    return {
      connectionState: pc.connectionState,
      packetsSent,
      offerHasAudioLevel: !!(pc.localDescription && pc.localDescription.sdp.includes(uri)),
      answerHasAudioLevel: !!(pc.remoteDescription && pc.remoteDescription.sdp.includes(uri)),
      answerCodecs: pc.remoteDescription
        ? [...new Set([...pc.remoteDescription.sdp.matchAll(/a=rtpmap:\d+ ([^/\r\n]+)/g)].map((m) => m[1]))]
        : [],
    };
  });
}

async function listenerFacts(page) {
  return page.evaluate(async () => {
    const audio = document.getElementById('remote-audio');
    const np = document.getElementById('now-playing');
    return {
      stats: await window.encore.recvStats(),
      recvState: window.encore.recvPc ? window.encore.recvPc.connectionState : 'none',
      nowPlaying: np.dataset.utterance || '',
      nowPlayingText: np.textContent,
      nowLive: document.getElementById('now-live').textContent,
      audioPlaying: !!(audio.srcObject && !audio.paused),
      utterances: window.encore.room().utterances.map((u) => u.utterance),
    };
  });
}

// -- main ----------------------------------------------------------------------------------------

async function main() {
  const result = { ok: false, server: serverUrl, room: roomName };
  const logs = [];
  const work = mkdtempSync(join(tmpdir(), 'encore-browser-'));
  const opened = [];
  const timeoutMs = timeoutS * 1000;
  const deadline = started + timeoutMs;
  const left = () => Math.max(1000, deadline - Date.now());

  try {
    if (!existsSync(chromiumPath)) fail(`no chromium at ${chromiumPath} (run scripts/browser-deps.sh)`);
    const { chromium } = loadPlaywright();

    let wav = wavArg;
    if (!wav) {
      const speech = makeSpeechWav(work);
      wav = speech.wav;
      result.speech = speech.truth;
      log(`speech WAV: ${speech.total_s} s at ${RATE} Hz, sentences ${speech.truth.map((t) => `${(t.start_sample / RATE).toFixed(2)}-${(t.end_sample / RATE).toFixed(2)} s`).join(', ')}`);
    }

    const a = await openPage(chromium, 'A', wav, logs);
    opened.push(a);
    const b = await openPage(chromium, 'B', null, logs);
    opened.push(b);
    log(`browsers: ${a.browser.version()}`);

    const peerA = await signInAndJoin(a, 'alice', 'speaker', left());
    const peerB = await signInAndJoin(b, 'bob', 'listener', left());
    result.peer_a = peerA;
    result.peer_b = peerB;

    // B sees A in the peer list.
    await waitFor(b, `peer ${peerA} in B's list`, (peer) => !!document.querySelector(`#peers li[data-peer="${CSS.escape(peer)}"]`), peerA, left());

    await b.page.click('#listen');
    await waitFor(b, 'the receive transport to connect', () => window.encore.recvPc && window.encore.recvPc.connectionState === 'connected', null, left());
    log('B: listening, receive transport connected');

    await a.page.click('#talk');
    await waitFor(a, 'the send transport to connect', () => window.encore.sendPc && window.encore.sendPc.connectionState === 'connected', null, left());
    const send = await sendSideFacts(a.page);
    result.send = send;
    log(`A: talking, send transport connected; offer has audio level: ${send.offerHasAudioLevel}, answer has it: ${send.answerHasAudioLevel}, codecs: ${send.answerCodecs.join(' ')}`);
    if (!send.offerHasAudioLevel) fail(`A's offer lacks the ${'urn:ietf:params:rtp-hdrext:ssrc-audio-level'} header extension`);
    if (!send.answerHasAudioLevel) fail('the server\'s answer did not negotiate the audio-level header extension');
    const talkAt = Date.now();

    // Now poll B until audio decoded and A's utterance shown as now playing.
    const pattern = new RegExp(`^${peerA.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}#\\d+$`);
    let sawNowPlaying = null;
    let last = null;
    let lastPrint = 0;
    for (;;) {
      last = await listenerFacts(b.page);
      if (!sawNowPlaying && pattern.test(last.nowPlaying)) {
        sawNowPlaying = { utterance: last.nowPlaying, live: last.nowLive, after_s: +((Date.now() - talkAt) / 1000).toFixed(2) };
        log(`B: now playing ${last.nowPlaying} (${last.nowLive}), ${sawNowPlaying.after_s} s after Talk`);
      }
      const audio = last.stats && last.stats.audio;
      if (Date.now() - lastPrint > 2000) {
        lastPrint = Date.now();
        log(`B: ${audio ? `${audio.packetsReceived} packets, energy ${audio.totalAudioEnergy.toFixed(4)}, level ${audio.audioLevel.toFixed(3)}` : 'no inbound audio yet'}; now playing "${last.nowPlayingText}"; audio element ${last.audioPlaying ? 'playing' : 'not playing'}`);
      }
      if (audio && audio.packetsReceived > 0 && audio.totalAudioEnergy > 0 && last.audioPlaying && sawNowPlaying) break;
      const error = (await pageError(b.page)) || (await pageError(a.page));
      if (error) fail(`a page shows an error: ${error}`);
      if (Date.now() > deadline) {
        const missing = [];
        if (!audio || !(audio.packetsReceived > 0)) missing.push('no inbound audio packets at B');
        else if (!(audio.totalAudioEnergy > 0)) missing.push(`B received ${audio.packetsReceived} packets but decoded no energy (totalAudioEnergy 0)`);
        if (!last.audioPlaying) missing.push('B\'s <audio> element is not playing');
        if (!sawNowPlaying) missing.push(`B never showed an utterance of ${peerA} as now playing (last: "${last.nowPlayingText}")`);
        const sendNow = await sendSideFacts(a.page).catch(() => null);
        if (sendNow) missing.push(`A sent ${sendNow.packetsSent} audio packets`);
        fail(`timeout after ${timeoutS} s: ${missing.join('; ')}`);
      }
      await new Promise((r) => setTimeout(r, 250));
    }

    // The page's controls, against the real server: each must be answered ok (no error shown).
    await clickAndCheck(b, '#like', 'Like');
    await clickAndCheck(b, `[data-testid="follow-${peerA}"]`, 'Follow');
    const pressed = await b.page.getAttribute(`[data-testid="follow-${peerA}"]`, 'aria-pressed');
    if (pressed !== 'true') fail(`B: the Follow toggle of ${peerA} is not pressed after the click`);
    // A pause of 1.5 s while A talks: B's position waits, and the stream resumes with the next
    // sequence number, so B's browser counts nothing lost (checked at the end).
    await clickAndCheck(b, '#pause-listen', 'Pause');
    await new Promise((r) => setTimeout(r, 1500));
    await clickAndCheck(b, '#pause-listen', 'Resume');
    log('B: Like, Follow, Pause (1.5 s) and Resume answered ok');

    // Measured, not asserted: the first utterance's length as the server saw it, against the
    // WAV's ground truth (the fake capture starts somewhere in the loop, so it may be cut).
    const endBy = Math.min(deadline, Date.now() + 12000);
    let ended = null;
    while (!ended && Date.now() < endBy) {
      ended = await b.page.evaluate((u) => {
        const x = window.encore.room().utterances.find((v) => v.utterance === u && v.duration_ms !== undefined);
        return x ? { utterance: x.utterance, duration_ms: x.duration_ms, reason: x.reason } : null;
      }, sawNowPlaying.utterance);
      if (!ended) await new Promise((r) => setTimeout(r, 250));
    }
    result.first_utterance = ended;
    if (ended) {
      const truth = (result.speech || []).map((t) => `${t.seconds} s`).join(', ');
      log(`B: ${ended.utterance} ended after ${(ended.duration_ms / 1000).toFixed(2)} s (${typeof ended.reason === 'string' ? ended.reason : JSON.stringify(ended.reason)}); the WAV's sentences last ${truth || '?'}`);
    }

    last = await listenerFacts(b.page);
    const sendEnd = await sendSideFacts(a.page);
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
    result.ok = false;
    result.error = error instanceof Failure ? error.message : `${error.stack || error}`;
    console.error(`[demo ${elapsed()}s] FAIL: ${result.error}`);
    if (logs.length) {
      console.error('--- browser logs ---');
      for (const line of logs.slice(-80)) console.error(line);
    }
  } finally {
    if (screenshots) {
      mkdirSync(screenshots, { recursive: true });
      for (const p of opened) {
        await p.page.screenshot({ path: join(screenshots, `${p.label}.png`), fullPage: true }).catch(() => {});
      }
    }
    for (const p of opened.reverse()) await p.browser.close().catch(() => {});
    rmSync(work, { recursive: true, force: true });
  }
  console.log(`RESULT ${JSON.stringify(result)}`);
  process.exit(result.ok ? 0 : 1);
}

// A hard stop, whatever hangs (a browser that does not close, a stuck evaluate).
setTimeout(() => {
  console.error(`[demo ${elapsed()}s] FAIL: hard timeout after ${timeoutS + 30} s`);
  console.log(`RESULT ${JSON.stringify({ ok: false, error: 'hard timeout' })}`);
  process.exit(1);
}, (timeoutS + 30) * 1000).unref();

main();
