// Gateway console: a Flowstorm Socket V1 client in one page.
//
// Protocol: shared/specs/flowstorm-socket-v1.md (Init -> Ready; Request -> SessionStarted,
// ResponseItem*, Response; InputAudioStreamOpen -> echo, binary LINEAR16 frames,
// Recognized (interim, then final), InputAudioStreamClose; SessionEnded).
// Client states: shared/specs/flowstorm-client-states.md, driven as that spec says:
//   Closed  at start and after Disconnect;   Open  when the socket is up (Init sent);
//   Failed  on an Error before Ready or a dropped socket (retried every 10 s);
//           one chat note per outage says why, updated by each failed attempt;
//   Sleeping  on Ready, and when a turn ends its session;
//   Listening  when a turn's output has played (session goes on), or the input audio
//              stream is open;
//   Processing  when text was sent or the final Recognized came; a gateway that then sends
//              nothing for longer than it may take (config.json's answerTimeoutS: its lock
//              wait and turn timeout, after which it answers an Error itself, plus a margin;
//              60 s until that is known) is taken for a dead connection (a half-open TCP one
//              never closes): Failed, and retried;
//   Responding  on ResponseItem/Response, until its audio has played (or was skipped).
// The sessionId is kept across reconnects until the session ends, so a client whose
// connection dropped goes on in the same session.
(() => {
  'use strict';

  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  // ?retry=SECONDS overrides the 10 s retry period of the spec (Failed state)
  const RETRY_MS = 1000 * (Number(params.get('retry')) || 10);
  // ?stall=SECONDS overrides the 30 s an answer's audio may go without progress (see playNext)
  const STALL_S = Number(params.get('stall')) || 30;
  // ?answer=SECONDS overrides how long Processing may go without a word of the gateway
  // (else the gateway's answerTimeoutS of config.json: see loadConfig; 60 s until it came)
  const ANSWER_OVERRIDE_S = Number(params.get('answer')) || 0;
  let answerS = ANSWER_OVERRIDE_S || 60;
  // ?listen=SECONDS overrides the 10 s Talk waits for the gateway to start listening
  const LISTEN_S = Number(params.get('listen')) || 10;
  const STT_RATE = 16000; // sttSampleRate sent in Init; the microphone is resampled to it
  const SOCKET_URL = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/socket/';

  let ws = null;            // the WebSocket while one is open or opening
  let wanted = false;       // the user asked to be connected (retry when it drops)
  let readyBefore = false;  // a Ready came before (this is a reconnect)
  let retryTimer = null;
  let outage = null;        // {lost, attempts, note} while the connection is down
  let ready = false;        // the current socket had its Ready
  let refusal = '';         // the text of an Error that refused Init on the current socket
  let state = null;
  let sessionId = null;     // the conversation's id, proposed by us, confirmed by SessionStarted
  let sessionTimer = null;  // forgets sessionId when a sleepTimeout expires
  let sessionKnown = false; // a SessionStarted confirmed sessionId (the gateway had it)
  let turn = null;          // {items, done, ended, sleepTimeout} of the answer being given
  const audioQueue = [];    // {src, li} of the TTS links still to play for the current answer
  let playing = null;       // the <audio> of the answer playing now
  let replaying = null;     // the <audio> of a replayed item (one stream at a time: see replay)
  let mic = null;           // {stream, ctx, acked, pending} while the microphone streams
  let userBubble = null;    // the bubble that shows what the recognizer heard so far
  let refocusText = false;  // the message field had the focus when it was disabled
  let answerTimer = null;   // gives up a connection that left a turn unanswered (Processing)

  // --------------------------------------------------------------- the page

  const deviceId = localStorage.getItem('console.deviceId') || 'console_' + randomId();
  localStorage.setItem('console.deviceId', deviceId);
  $('key').value = params.get('key') || localStorage.getItem('console.key') || 'console';
  $('locale').value = params.get('locale') || localStorage.getItem('console.locale') || 'en';

  function randomId() { // crypto.randomUUID needs a secure context; this does not
    return Array.from(crypto.getRandomValues(new Uint8Array(16)),
      (b) => b.toString(16).padStart(2, '0')).join('');
  }

  function setState(next) {
    if (next === state) return;
    state = next;
    awaitAnswer();
    document.body.dataset.state = next;
    for (const li of $('states').children) li.setAttribute('aria-current', String(li.dataset.state === next));
    const entry = document.createElement('li');
    entry.textContent = next;
    $('history').append(entry);
    const connected = ['Open', 'Sleeping', 'Listening', 'Processing', 'Responding'].includes(next);
    $('connect').textContent = connected || wanted ? 'Disconnect' : 'Connect';
    const idle = next === 'Sleeping' || next === 'Listening';
    for (const id of ['send', 'start']) $(id).disabled = !idle;
    // the message field stays usable while the bot answers (the next message can be typed;
    // Enter sends only when Send is enabled), so the keyboard's focus stays in it; when the
    // connection drops it is disabled, and it gets the focus back once connected again
    const typing = idle || next === 'Processing' || next === 'Responding';
    if (!typing && document.activeElement === $('text')) refocusText = true;
    $('text').disabled = !typing;
    if (typing && refocusText) { refocusText = false; $('text').focus(); }
    $('mic').disabled = !(idle || mic);
    $('key').disabled = $('locale').disabled = connected || wanted;
  }

  function awaitAnswer() { // (re)armed in Processing by each event: answerS of silence ends it
    clearTimeout(answerTimer);
    if (state === 'Processing') answerTimer = setTimeout(noAnswer, answerS * 1000);
  }

  async function loadConfig() { // the gateway's limits the page follows (/console/config.json)
    if (ANSWER_OVERRIDE_S) return;
    try {
      const answer = await fetch('config.json', {cache: 'no-store', signal: AbortSignal.timeout(10000)});
      const config = await answer.json();
      if (answer.ok && Number(config.answerTimeoutS) > 0) answerS = Number(config.answerTimeoutS);
    } catch (error) { /* an older gateway, or none: the 60 s stay */ }
    logEvent('·', `no-answer limit ${answerS} s`);
  }

  function noAnswer() { // the socket is given up as dropped: Failed, one note, retried
    const socket = ws;
    if (!socket || state !== 'Processing') return;
    const dropped = socket.onclose;
    socket.onclose = null;
    socket.close(4000, 'no answer');
    dropped({code: 0, reason: `no answer for ${answerS} s`});
  }

  function showSession() { $('session').textContent = sessionId || 'none'; }

  function say(kind, text) { // a chat bubble: 'user', 'bot', 'note' or 'note error'
    const li = document.createElement('li');
    li.className = kind;
    li.textContent = text;
    $('chat').append(li);
    li.scrollIntoView({block: 'end'});
    return li;
  }

  function logEvent(direction, what) { // the developer's view of the wire
    const li = document.createElement('li');
    const text = typeof what === 'string' ? what : JSON.stringify(what);
    li.textContent = `${new Date().toISOString().slice(11, 23)} ${direction} ${text.slice(0, 400)}`;
    $('events').append(li);
    while ($('events').children.length > 300) $('events').firstChild.remove();
  }

  // ------------------------------------------------------------- connection

  function connect() {
    clearTimeout(retryTimer);
    wanted = true;
    localStorage.setItem('console.key', $('key').value);
    localStorage.setItem('console.locale', $('locale').value);
    const socket = ws = new WebSocket(SOCKET_URL);
    socket.binaryType = 'arraybuffer';
    let opened = false;
    ready = false;
    refusal = '';
    socket.onopen = () => {
      opened = true;
      setState('Open');
      send({
        type: 'Init', key: $('key').value, deviceId,
        config: {
          locale: $('locale').value, zoneId: Intl.DateTimeFormat().resolvedOptions().timeZone,
          sttMode: 'SingleUtterance', sttSampleRate: STT_RATE, sttInterimResults: true,
          tts: 'RequiredLinks', ttsFileType: 'mp3', returnSsml: false, silenceTimeout: 5000,
          sendResponseItems: true,
        },
      });
    };
    socket.onmessage = (message) => {
      if (typeof message.data !== 'string') return;
      let event = null;
      try { event = JSON.parse(message.data); } catch (error) { /* said below */ }
      if (event && typeof event === 'object' && !Array.isArray(event)) receive(event);
      else notJson(message.data);
    };
    socket.onclose = (close) => {
      if (socket !== ws) return; // an old socket we already gave up
      ws = null;
      logEvent('×', `socket closed ${close.code} ${close.reason}`);
      stopMic(false);
      stopAudio();
      turn = null;
      if (wanted) { // dropped, or refused: Failed, and try again
        setState('Failed');
        retryTimer = setTimeout(connect, RETRY_MS);
        if (ready) { // one note per outage, updated by the attempts that follow
          outage = {lost: `Connection lost (${closeMeaning(close)})`, attempts: 0, note: null};
          showOutage('');
        } else { // an attempt that failed: refused (Error, close), or not opened at all
          if (!outage) outage = {lost: '', attempts: 0, note: null};
          outage.attempts++;
          if (opened) {
            // (the close reason repeats the Error's text: the code alone then)
            showOutage(refusal ? `${refusal.replace(/\.$/, '')} (${close.code})` : `closed (${closeMeaning(close)})`);
          } else {
            const attempt = outage, count = outage.attempts; // unless a later one said more
            whyRefused().then((why) => { if (outage === attempt && attempt.attempts === count) showOutage(why); });
          }
        }
      } else {
        setState('Closed');
      }
    };
  }

  function closeMeaning(close) { // a close code (RFC 6455 section 7.4.1), and what it says
    const meaning = close.reason || {
      1001: 'the gateway went away', 1006: 'no close frame', 1008: 'refused',
      1011: 'a failure of the gateway', 1012: 'the gateway restarts', 1013: 'try again later',
    }[close.code];
    if (!close.code) return meaning; // (given up by the page: no close code)
    return meaning ? `${close.code}: ${meaning}` : String(close.code);
  }

  async function whyRefused() { // a browser does not tell why a WebSocket was not opened
    try {
      const answer = await fetch('/healthz', {cache: 'no-store', signal: AbortSignal.timeout(5000)});
      if (answer.ok) return 'the gateway answers, but refused the WebSocket';
      let detail = '';
      try { detail = (await answer.json()).detail || ''; } catch (error) { /* not JSON */ }
      return `the gateway answered ${answer.status}${detail ? ': ' + detail : ''}`;
    } catch (error) {
      return 'the gateway does not answer';
    }
  }

  function showOutage(why) { // the outage's note: what happened, the attempts, the next try
    const {lost, attempts} = outage;
    const tries = attempts > 1 ? ` (${attempts} attempts)` : '';
    const failed = attempts ? `${lost ? lost + '. Not connected again' : 'Could not connect'}${tries}: ${why}` : lost;
    const text = `${failed.replace(/\.$/, '')}. Trying again in ${RETRY_MS / 1000} s.`;
    if (outage.note) outage.note.textContent = text; else outage.note = say('note error', text);
  }

  function disconnect() {
    wanted = false;
    outage = null;
    clearTimeout(retryTimer);
    if (ws) ws.close(1000); else setState('Closed');
  }

  function send(frame) {
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(frame));
    logEvent('→', frame);
    return true;
  }

  // ----------------------------------------------------------- server events

  function receive(event) {
    logEvent('←', event);
    if (state === 'Processing') awaitAnswer(); // the gateway is there: the turn goes on
    switch (event.type) {
      case 'Ready':
        outage = null;
        ready = true;
        // (whether the gateway still has the session, the first turn's SessionStarted tells)
        if (readyBefore) say('note', 'Connected again.');
        readyBefore = true;
        setState('Sleeping');
        break;
      case 'SessionStarted':
        // a session we talked in before, announced without `resumed`, was created anew: the
        // gateway lost it (a restart with the memory store, or it expired)
        if (sessionKnown && event.sessionId === sessionId && !event.resumed) {
          say('note error', 'The conversation started over: the gateway no longer had it ' +
            '(it restarted, or the session expired).');
        }
        keepSession(event.sessionId);
        sessionKnown = true;
        break;
      case 'SessionEnded':
        forgetSession();
        break;
      case 'InputAudioStreamOpen': // the server listens: stream what was captured so far
        if (mic) {
          mic.acked = true;
          mic.pending.forEach(sendAudio);
          mic.pending = [];
          setState('Listening');
        }
        break;
      case 'Recognized':
        heard(event.text, event.isFinal !== false);
        break;
      case 'ResponseItem':
        answerItems([event.responseItem]);
        break;
      case 'Response': {
        const response = event.response;
        // with sendResponseItems the items came before; older servers repeat them here
        if (!turn || turn.items === 0) answerItems(response.items || []);
        turn.done = true;
        turn.ended = response.sessionEnded;
        turn.sleepTimeout = response.sleepTimeout || 0;
        afterOutput();
        break;
      }
      case 'Error':
        if (state === 'Open') { // Init refused: the socket closes; the outage note says why
          refusal = event.text || 'Error';
          setState('Failed');
          break;
        }
        say('note error', event.text || 'Error');
        stopMic(false);
        if (state === 'Processing' || state === 'Listening') setState(sessionId ? 'Listening' : 'Sleeping');
        break;
      default:
        break; // unknown events are ignored
    }
  }

  function notJson(text) { // a frame that is no event: shown (as text only), never dropped
    logEvent('←', text);
    const shown = text.length > 200 ? text.slice(0, 200) + '…' : text;
    say('note error', `The gateway sent a frame that is not a JSON event: ${shown}`);
  }

  function keepSession(id) {
    clearTimeout(sessionTimer);
    if (id !== sessionId) sessionKnown = false;
    sessionId = id;
    showSession();
  }

  function forgetSession() {
    clearTimeout(sessionTimer);
    sessionId = null;
    sessionKnown = false;
    showSession();
  }

  // ------------------------------------------------------------- user input

  function sendText(text) {
    if (!text || (state !== 'Sleeping' && state !== 'Listening')) return;
    if (mic) { stopMic(false); send({type: 'InputAudioStreamCancel'}); }
    if (!sessionId) keepSession(randomId()); // proposed; SessionStarted confirms it
    const sent = send({
      type: 'Request',
      request: {
        appKey: $('key').value, deviceId, sessionId,
        input: {
          locale: $('locale').value, zoneId: Intl.DateTimeFormat().resolvedOptions().timeZone,
          transcript: {text},
        },
        attributes: {clientType: 'gateway-console:1'},
      },
    });
    if (!sent) return;
    if (text.startsWith('#')) say('note', text); else say('user', text);
    turn = {items: 0, done: false};
    setState('Processing');
  }

  async function startMic() {
    if (mic || (state !== 'Sleeping' && state !== 'Listening')) return;
    if (!navigator.mediaDevices || !window.AudioWorkletNode) { // (both need a secure context)
      say('note error', window.isSecureContext ? 'Microphone: this browser cannot capture audio.'
        : `Microphone: the browser allows it on https:// or http://localhost only, not on ${location.origin}.`);
      return;
    }
    mic = {acked: false, pending: [], bytes: 0};
    $('mic').classList.add('on');
    $('mic').textContent = 'Stop';
    try {
      const current = mic;
      const stream = await navigator.mediaDevices.getUserMedia({
        audio: {channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true},
      });
      const ctx = new AudioContext();
      Object.assign(current, {stream, ctx});
      if (mic !== current) { stopTracks(current); return; } // stopped meanwhile
      await ctx.audioWorklet.addModule('capture-worklet.js');
      const node = new AudioWorkletNode(ctx, 'linear16-capture', {processorOptions: {targetRate: STT_RATE}});
      node.port.onmessage = (message) => { // one 100 ms LINEAR16 chunk
        if (mic !== current || !ws) return;
        if (current.acked) sendAudio(message.data); else current.pending.push(message.data);
      };
      ctx.createMediaStreamSource(stream).connect(node);
      node.connect(ctx.destination); // pulls the graph; the worklet outputs silence
      userBubble = null;
      // a reconnected client names its session, so the utterance goes on in it
      send(sessionId ? {type: 'InputAudioStreamOpen', sessionId} : {type: 'InputAudioStreamOpen'});
      // the gateway echoes InputAudioStreamOpen when it listens; without it for LISTEN_S the
      // stream is given up (cancelled), said, and Talk is back
      current.listenTimer = setTimeout(() => {
        if (mic !== current || current.acked) return;
        say('note error', `The gateway did not start listening within ${LISTEN_S} s.`);
        stopMic(false);
        send({type: 'InputAudioStreamCancel'});
      }, LISTEN_S * 1000);
    } catch (error) {
      say('note error', `Microphone: ${error.message || error}`);
      stopMic(false);
    }
  }

  function sendAudio(chunk) { // one binary frame of LINEAR16
    ws.send(chunk);
    mic.bytes += chunk.byteLength;
  }

  function stopTracks(m) {
    if (m.stream) m.stream.getTracks().forEach((track) => track.stop());
    if (m.ctx) m.ctx.close();
  }

  function stopMic(sendClose) { // sendClose: tell the server the stream is over
    if (!mic) return;
    clearTimeout(mic.listenTimer);
    stopTracks(mic);
    if (mic.bytes) logEvent('→', `audio: ${(mic.bytes / 2 / STT_RATE).toFixed(1)} s of LINEAR16 at ${STT_RATE} Hz`);
    mic = null;
    $('mic').classList.remove('on');
    $('mic').textContent = 'Talk';
    $('mic').disabled = !(state === 'Sleeping' || state === 'Listening');
    if (sendClose) send({type: 'InputAudioStreamClose'});
  }

  function heard(text, final) { // Recognized: interim text replaces the last, final ends it
    if (!userBubble) userBubble = say('user interim', '');
    userBubble.textContent = text;
    if (!final) return;
    userBubble.classList.remove('interim');
    userBubble = null;
    stopMic(true);
    turn = {items: 0, done: false};
    setState('Processing');
  }

  // ------------------------------------------------------------ bot output

  function answerItems(items) {
    if (!turn) turn = {items: 0, done: false}; // a push while Sleeping starts an answer too
    for (const item of items) {
      turn.items++;
      // the gateway's one rule (gateway.events.is_command): a command is a text beginning with
      // '#' (stripped) and no ssml; it carries code, not words. An item with ssml is speech,
      // its words shown whatever they are ("#1 hit"): the gateway sends an ssml-only item's
      // words as its text. An item may be a sound or a picture alone.
      const text = (item.text || '').trim();
      const words = text.startsWith('#') && !item.ssml ? '' : text;
      if (!words && !item.image && !item.audio) continue;
      const li = say('bot', words);
      if (item.image) li.append(Object.assign(document.createElement('img'), {src: item.image, alt: ''}));
      if (item.audio) {
        audioQueue.push({src: item.audio, li});
        const button = Object.assign(document.createElement('button'), {type: 'button', className: 'play', textContent: '▶'});
        button.title = 'Play again';
        button.setAttribute('aria-label', 'Play again');
        button.onclick = () => replay(item.audio, li);
        li.append(button);
      }
    }
    setState('Responding');
    playNext();
  }

  function playNext() { // the answer's TTS links, one after another
    if (playing || !audioQueue.length) return;
    stopReplay(); // the answer's audio is heard, not an old item's
    const {src, li} = audioQueue.shift();
    const audio = playing = new Audio(src);
    let finished = false;
    const next = () => {
      if (finished) return;
      finished = true;
      clearTimeout(guard);
      if (playing === audio) playing = null;
      playNext();
      afterOutput();
    };
    const failed = (error) => {
      if (playing === audio) audioFailed(audio, li, error); // (not when the user skipped it)
      release(audio);
      next();
    };
    // a link that never ends (no audio device, a stalled download) must not hang the client:
    // STALL_S (30 s) without progress end it; a long answer that plays on is not cut short
    const stalled = () => failed(`(no progress for ${STALL_S} s)`);
    let guard = setTimeout(stalled, STALL_S * 1000);
    audio.ontimeupdate = () => { clearTimeout(guard); guard = setTimeout(stalled, STALL_S * 1000); };
    audio.onended = next;
    audio.onerror = () => failed(audio.error && audio.error.message);
    audio.play().catch(failed);
  }

  function replay(src, li) { // an item's audio again: whatever plays stops first (the answer's is skipped)
    stopAudio();
    afterOutput();
    const audio = replaying = new Audio(src);
    audio.onended = () => { if (replaying === audio) replaying = null; };
    audio.onplaying = () => { // it plays now: an earlier failure's note goes
      const note = li.querySelector('.audio-failed');
      if (note) { note.remove(); li.querySelector('button.play').removeAttribute('aria-describedby'); }
    };
    const failed = (error) => {
      if (replaying !== audio) return; // stopped meanwhile (Skip, another replay, an answer)
      replaying = null;
      audioFailed(audio, li, error);
      release(audio);
    };
    audio.onerror = () => failed(audio.error && audio.error.message);
    audio.play().catch(failed);
  }

  function audioFailed(audio, li, error) { // logged, and said by the item whose audio it was
    logEvent('!', `audio not played: ${audio.src} ${error || ''}`);
    let note = li.querySelector('.audio-failed');
    if (!note) { // (inside the chat's live region: read out as it appears)
      note = Object.assign(document.createElement('span'), {className: 'audio-failed', id: 'audio-note-' + randomId()});
      li.append(note);
      const button = li.querySelector('button.play'); // its replay button is described by it
      if (button) button.setAttribute('aria-describedby', note.id);
    }
    note.textContent = 'Audio could not be played.';
  }

  function release(audio) { // stop an <audio> for good: its pending download is aborted too
    audio.onended = audio.onerror = audio.ontimeupdate = audio.onplaying = null;
    audio.pause();
    audio.removeAttribute('src');
    audio.load(); // (with no src: the media element's fetch ends, the gateway's synthesis with it)
  }

  function stopReplay() {
    if (replaying) { release(replaying); replaying = null; }
  }

  function stopAudio() { // the answer's audio and any replay: stopped, their downloads aborted
    audioQueue.length = 0;
    stopReplay();
    if (playing) {
      const audio = playing;
      playing = null;
      release(audio);
    }
  }

  function afterOutput() { // the answer is over once the Response came and its audio played
    if (!turn || !turn.done || playing || audioQueue.length) return;
    const {ended, sleepTimeout} = turn;
    turn = null;
    if (!ended) { setState('Listening'); return; }
    if (sleepTimeout > 0) { // keep the session for sleepTimeout seconds
      clearTimeout(sessionTimer);
      sessionTimer = setTimeout(forgetSession, sleepTimeout * 1000);
    } else {
      forgetSession();
    }
    setState('Sleeping');
  }

  // -------------------------------------------------------------- controls

  $('connection').onsubmit = (event) => {
    event.preventDefault();
    if (ws || wanted) disconnect(); else connect();
  };
  $('composer').onsubmit = (event) => {
    event.preventDefault();
    if (state !== 'Sleeping' && state !== 'Listening') return; // typed ahead: kept for later
    const text = $('text').value.trim();
    $('text').value = '';
    sendText(text);
  };
  $('start').onclick = () => sendText('#intro');
  $('mic').onclick = () => { if (mic) stopMic(true); else startMic(); };
  $('skip').onclick = () => { stopAudio(); afterOutput(); };

  // Leaving the page (a link, the Back button) may keep it in the back/forward cache, its
  // WebSocket open: the gateway would deliver answers and pushes to a page nobody sees.
  // So the socket closes when the page is hidden, and a page shown again from the cache
  // connects again at once, in the same session.
  let resume = false;
  window.addEventListener('pagehide', () => {
    resume = wanted;
    wanted = false;
    clearTimeout(retryTimer);
    const socket = ws;
    ws = null;
    stopMic(false);
    stopAudio();
    turn = null;
    outage = null;
    if (socket) { socket.onclose = null; socket.close(1000, 'page hidden'); }
    setState('Closed');
  });
  window.addEventListener('pageshow', (event) => {
    if (event.persisted && resume) { resume = false; connect(); }
  });

  showSession();
  setState('Closed');
  loadConfig();
})();
