// Drives bindings/web/interlink.js under Deno for tests/api/test_web_client.py.
//
// One JSON command per line on stdin, one JSON answer per line on stdout, in order:
//   {"op": "connect", "name": "alice", "url": ..., "token": ..., "device": 1, "rootPublic": ...}
//   -> {"ok": true, ...}  or  {"ok": false, "error": {"code": ..., "message": ...}}
// Bytes travel as hex. Several named clients can be open at once; their sessions keep running
// (reading, confirming deliveries) between commands. What each client's callbacks saw is kept
// (op "events"); with "throwing": true every callback also throws, as a buggy page's might.

import { connect, decode, encode, fromHex, KeyPair, NoiseXXInitiator, toHex } from "../../bindings/web/interlink.js";

const clients = new Map();
const records = new Map(); // name -> {events, closed: Promise<closeInfo>}
const utf8 = new TextDecoder("utf-8", { fatal: true });

function client(name) {
  const found = clients.get(name);
  if (!found) throw new Error(`no client named ${name}`);
  return found;
}

function ackInfo(ack) {
  return { ts: ack.ts, dup: ack.dup ?? false, id: toHex(ack.id) };
}

function errorInfo(error) {
  return error ? { name: error.name, code: error.code ?? null, message: error.message } : null;
}

function closeInfo(info) {
  return { code: info.code ?? null, reason: info.reason ?? null, bye: info.bye, error: errorInfo(info.error) };
}

function dlvInfo(dlv) {
  const info = { t: dlv.t, k: dlv.k, seq: dlv.seq, from: dlv.from, dev: dlv.dev, id: toHex(dlv.id) };
  if (dlv.c instanceof Uint8Array) {
    info.c = toHex(dlv.c);
    try {
      info.text = utf8.decode(dlv.c);
    } catch { /* not text */ }
  }
  return info;
}

// A Noise vector replayed on the initiator's side: what it writes (ciphertexts) and reads
// (payloads), in the vector's order. After XX the responder sends the first transport message.
async function replay(vector) {
  const hs = await NoiseXXInitiator.create({
    prologue: fromHex(vector.init_prologue),
    staticKey: await KeyPair.fromPrivate(fromHex(vector.init_static)),
    ephemeralKey: await KeyPair.fromPrivate(fromHex(vector.init_ephemeral)),
  });
  const m = vector.messages;
  const outputs = [
    toHex(await hs.writeMessage1(fromHex(m[0].payload))),
    toHex(await hs.readMessage2(fromHex(m[1].ciphertext))),
    toHex(await hs.writeMessage3(fromHex(m[2].payload))),
  ];
  for (let i = 3; i < m.length; i++) {
    if ((i - 3) % 2 === 0) outputs.push(toHex(await hs.receive.decryptWithAd(new Uint8Array(0), fromHex(m[i].ciphertext))));
    else outputs.push(toHex(await hs.send.encryptWithAd(new Uint8Array(0), fromHex(m[i].payload))));
  }
  return { outputs, handshakeHash: toHex(hs.handshakeHash), remoteStatic: toHex(hs.remoteStatic) };
}

const ops = {
  async connect(cmd) {
    const statuses = [];
    const throwing = Boolean(cmd.throwing);
    const appBug = (what) => { if (throwing) throw new Error(`a page's ${what} callback failed`); };
    const c = await connect({
      url: cmd.url, token: cmd.token, device: cmd.device ?? 1, rootPublic: cmd.rootPublic, agent: "deno-test",
      timeoutMs: cmd.timeoutMs ?? 5000, onStatus: (s) => { statuses.push(s); appBug("onStatus"); },
      ...(cmd.nowMs !== undefined ? { now: () => cmd.nowMs } : {}),
    });
    const closedAtResolve = c.closed;
    clients.set(cmd.name, c);
    const events = [];
    let closed;
    const whenClosed = new Promise((resolve) => { closed = resolve; });
    records.set(cmd.name, { events, whenClosed });
    c.onState = (stanza) => { events.push({ kind: "state", from: String(stanza.from), s: String(stanza.s) }); appBug("onState"); };
    c.onError = (error) => { events.push({ kind: "error", error: errorInfo(error) }); appBug("onError"); };
    c.onClose = (info) => { closed(closeInfo(info)); appBug("onClose"); };
    const { user, device, pending, limits } = c.welcome;
    return { welcome: { user, device, pending, limits }, node: c.certificate.node, statuses, closedAtResolve };
  },
  async send(cmd) {
    const byDevice = Object.fromEntries(Object.entries(cmd.c).map(([d, hex]) => [d, fromHex(hex)]));
    return { ack: ackInfo(await client(cmd.name).send(cmd.to, byDevice)) };
  },
  async sendText(cmd) {
    return { ack: ackInfo(await client(cmd.name).sendText(cmd.to, cmd.text)) };
  },
  async burst(cmd) {
    // Queued in one go: they leave coalesced in few transport messages (§4).
    const c = client(cmd.name);
    const devices = cmd.devices ?? [1];
    const acks = await Promise.all(cmd.texts.map((text) => c.send(cmd.to, new Map(devices.map((d) => [d, text])))));
    return { acks: acks.map(ackInfo) };
  },
  async next(cmd) {
    return { dlv: dlvInfo(await client(cmd.name).nextMessage(cmd.timeoutMs ?? 5000)) };
  },
  async ping(cmd) {
    return { rtt: await client(cmd.name).ping() };
  },
  async close(cmd) {
    const c = client(cmd.name);
    const started = performance.now();
    await c.close();
    clients.delete(cmd.name);
    return { code: c.closeInfo.code ?? null, bye: c.closeInfo.bye, ms: performance.now() - started };
  },
  // The closeInfo the client's onClose got, waiting up to timeoutMs for it.
  async closed(cmd) {
    const { whenClosed } = records.get(cmd.name);
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${cmd.name} not closed within ${cmd.timeoutMs ?? 5000} ms`)), cmd.timeoutMs ?? 5000);
    });
    try {
      return { info: await Promise.race([whenClosed, timeout]) };
    } finally {
      clearTimeout(timer);
    }
  },
  events(cmd) {
    return { events: records.get(cmd.name).events };
  },
  async vector(cmd) {
    return await replay(cmd.vector);
  },
  msgpack(cmd) {
    return { hex: toHex(encode(decode(fromHex(cmd.hex)))) };
  },
};

async function answer(line) {
  let cmd;
  try {
    cmd = JSON.parse(line);
    const op = ops[cmd.op];
    if (!op) throw new Error(`unknown op ${cmd.op}`);
    return { ok: true, ...(await op(cmd)) };
  } catch (error) {
    return { ok: false, error: errorInfo(error) };
  }
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();
let buffered = "";
for await (const chunk of Deno.stdin.readable) {
  buffered += decoder.decode(chunk, { stream: true });
  let newline;
  while ((newline = buffered.indexOf("\n")) >= 0) {
    const line = buffered.slice(0, newline);
    buffered = buffered.slice(newline + 1);
    if (!line.trim()) continue;
    const reply = await answer(line);
    await Deno.stdout.write(encoder.encode(JSON.stringify(reply) + "\n"));
  }
}
for (const c of clients.values()) await c.close();
