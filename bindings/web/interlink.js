// Interlink web client: the protocol of docs/protocol.md (version 1) over WebSocket, in the browser.
//
// An ES module without dependencies. Every cryptographic primitive is the browser's WebCrypto
// (crypto.subtle): X25519, Ed25519, AES-256-GCM, SHA-256 and HMAC-SHA256. This file only composes
// them into the Noise handshake, exactly as the Noise specification (revision 34) describes it.
// It speaks suite 0x02, Noise_XX_25519_AESGCM_SHA256 (§2): WebCrypto has no ChaCha20-Poly1305.
//
//   import { connect } from "./interlink.js";
//   const client = await connect({ url, token, device: 1, rootPublic });
//   client.onMessage = (dlv) => console.log(dlv.from, new TextDecoder().decode(dlv.c));
//   await client.sendText("bob@beta", "hello");   // or client.send(to, { 1: bytes, 2: bytes })
//   await client.ping();
//   await client.close();
//
// Browsers: X25519 and Ed25519 in WebCrypto are recent: Chrome/Edge 137+, Firefox 130+, Safari 17+.
// crypto.subtle exists only in secure contexts (https:, or http://localhost / 127.0.0.1).
// The same file runs under Deno, which is how the project's tests run it.

const subtle = globalThis.crypto.subtle;
const utf8Encoder = new TextEncoder();
// ignoreBOM: a leading U+FEFF is part of a msgpack str (§0), not a byte-order mark to drop.
const utf8Decoder = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
const EMPTY = new Uint8Array(0);

// ------------------------------------------------------------------------------- constants

/** §2: the suite byte of Noise_XX_25519_AESGCM_SHA256. */
export const SUITE = 0x02;
export const PROTOCOL_NAME = "Noise_XX_25519_AESGCM_SHA256";
/** §1: "IL", protocol version 1, the suite byte. Also the Noise prologue (§1 step 2). */
export const PREAMBLE = Uint8Array.of(0x49, 0x4c, 0x01, SUITE);

const DHLEN = 32; // Curve25519
const HASHLEN = 32; // SHA-256
const TAGLEN = 16; // AES-GCM tag
const MAX_MESSAGE = 65535; // §1: a frame (here: one WebSocket message) holds 1..65535 bytes
const CLOSE_WAIT_MS = 3000; // how long to wait for the WebSocket close event before ending anyway
const MAX_STANZAS_PER_MESSAGE = 256; // §4
const CERT_CONTEXT = utf8Encoder.encode("interlink-node-cert-v1"); // §2 server hello
const SIGNATURE_BYTES = 64;

/** Every failure this module reports. `code` is the gateway's error code (§5: "bad_audience",
 * "device_mismatch", ...) or one of this client's own: "certificate" (the server hello was
 * refused: wrong operator, expired certificate...), "handshake", "closed", "bye" (the gateway
 * ended the session, §5: the reason is in the message and `stanza.reason`), "timeout",
 * "bad_frame", "protocol" (the gateway sent a stanza this client cannot use). `stanza` is the
 * gateway's `err` (or `bye`) stanza when there was one. */
export class InterlinkError extends Error {
  constructor(code, message, stanza = undefined) {
    super(message);
    this.name = "InterlinkError";
    this.code = code;
    this.stanza = stanza;
  }
}

// ----------------------------------------------------------------------------------- bytes

/** Bytes from a Uint8Array, ArrayBuffer, typed array / DataView, or a string (as UTF-8). */
export function toBytes(value) {
  if (value instanceof Uint8Array) return value;
  if (value instanceof ArrayBuffer) return new Uint8Array(value);
  if (ArrayBuffer.isView(value)) return new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
  if (typeof value === "string") return utf8Encoder.encode(value);
  throw new TypeError(`expected bytes or a string, got ${typeof value}`);
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

function equalBytes(a, b) {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a[i] ^ b[i];
  return diff === 0;
}

// A field of the gateway's, for a message: a string as it is, anything else only described.
// Never `${value}` on what the gateway sent: a msgpack map with a "toString" key would throw.
function describe(value) {
  if (typeof value === "string") return value;
  if (value === null || value === undefined || ["number", "bigint", "boolean"].includes(typeof value)) return String(value);
  return value instanceof Uint8Array ? `bin(${value.length})` : Array.isArray(value) ? "an array" : "a map";
}

const isInt = (value) => Number.isInteger(value) || typeof value === "bigint"; // msgpack int (bool is not)

export function toHex(bytes) {
  return Array.from(toBytes(bytes), (b) => b.toString(16).padStart(2, "0")).join("");
}

export function fromHex(text) {
  if (typeof text !== "string" || !/^([0-9a-fA-F]{2})*$/.test(text)) throw new TypeError("not a hex string");
  return Uint8Array.from(text.match(/../g) ?? [], (pair) => parseInt(pair, 16));
}

/** base64url (padding optional) or standard base64 to bytes. */
export function fromBase64(text) {
  const plain = text.replace(/-/g, "+").replace(/_/g, "/").replace(/=+$/, "");
  const binary = atob(plain + "=".repeat((4 - (plain.length % 4)) % 4));
  return Uint8Array.from(binary, (c) => c.charCodeAt(0));
}

// --------------------------------------------------------------------------------- msgpack
// §0 conventions: msgpack with bin for bytes, str (UTF-8) for text, plain ints for numbers.
// Encoding: null/undefined -> nil, booleans, numbers (integers in the smallest int format, other
// numbers as float64), BigInt (int64/uint64), strings, bytes (bin), arrays, Map (any keys: use
// one for int keys, e.g. a msg's `c`) and plain objects (str keys; undefined members left out).
// Decoding: maps whose keys are all strings become plain objects, other maps become Map; ints
// beyond 2^53 become BigInt; bin becomes Uint8Array; float32/float64 become numbers.

/** A float read with `decode(bytes, { wrapFloats: true })`, so an int check can tell 1.0 from 1. */
export class MsgpackFloat {
  constructor(value) {
    this.value = value;
  }
}

export class MsgpackError extends Error {
  constructor(message) {
    super(message);
    this.name = "MsgpackError";
  }
}

const MAX_DEPTH = 64;

class Writer {
  constructor() {
    this.buf = new Uint8Array(256);
    this.view = new DataView(this.buf.buffer);
    this.length = 0;
  }
  // Grows the buffer when needed (a new buf and view): call it before reading this.buf/this.view.
  reserve(n) {
    if (this.length + n > this.buf.length) {
      let size = this.buf.length * 2;
      while (size < this.length + n) size *= 2;
      const grown = new Uint8Array(size);
      grown.set(this.buf.subarray(0, this.length));
      this.buf = grown;
      this.view = new DataView(grown.buffer);
    }
    const at = this.length;
    this.length += n;
    return at;
  }
  byte(v) { const at = this.reserve(1); this.buf[at] = v; }
  put(size, setter, v) { const at = this.reserve(size); this.view[setter](at, v); }
  u16(tag, v) { this.byte(tag); this.put(2, "setUint16", v); }
  u32(tag, v) { this.byte(tag); this.put(4, "setUint32", v); }
  raw(bytes) { const at = this.reserve(bytes.length); this.buf.set(bytes, at); }
  result() { return this.buf.slice(0, this.length); }
}

const UINT64_MAX = (1n << 64n) - 1n;
const INT64_MIN = -(1n << 63n);

function writeInt(w, v) {
  if (typeof v === "bigint") {
    if (v < INT64_MIN || v > UINT64_MAX) throw new MsgpackError(`integer ${v} does not fit 64 bits`);
    if (v >= -0x80000000n && v <= 0xffffffffn) return writeInt(w, Number(v));
    w.byte(v < 0n ? 0xd3 : 0xcf);
    return w.put(8, v < 0n ? "setBigInt64" : "setBigUint64", v);
  }
  if (v >= 0) {
    if (v < 0x80) w.byte(v);
    else if (v <= 0xff) { w.byte(0xcc); w.byte(v); }
    else if (v <= 0xffff) w.u16(0xcd, v);
    else if (v <= 0xffffffff) w.u32(0xce, v);
    else writeInt(w, BigInt(v));
  } else {
    if (v >= -32) w.byte(v & 0xff);
    else if (v >= -0x80) { w.byte(0xd0); w.byte(v & 0xff); }
    else if (v >= -0x8000) { w.byte(0xd1); w.put(2, "setInt16", v); }
    else if (v >= -0x80000000) { w.byte(0xd2); w.put(4, "setInt32", v); }
    else writeInt(w, BigInt(v));
  }
}

function writeLength(w, n, fix, fixMax, tag8, tag16, tag32) {
  if (n <= fixMax) w.byte(fix | n);
  else if (tag8 !== null && n <= 0xff) { w.byte(tag8); w.byte(n); }
  else if (n <= 0xffff) w.u16(tag16, n);
  else w.u32(tag32, n);
}

function writeValue(w, value, depth) {
  if (depth > MAX_DEPTH) throw new MsgpackError("value nested too deeply");
  if (value === null || value === undefined) return w.byte(0xc0);
  switch (typeof value) {
    case "boolean":
      return w.byte(value ? 0xc3 : 0xc2);
    case "bigint":
      return writeInt(w, value);
    case "number":
      if (Number.isInteger(value) && value >= -(2 ** 63) && value < 2 ** 64) return writeInt(w, value);
      w.byte(0xcb);
      return w.put(8, "setFloat64", value);
    case "string": {
      const bytes = utf8Encoder.encode(value);
      writeLength(w, bytes.length, 0xa0, 31, 0xd9, 0xda, 0xdb);
      return w.raw(bytes);
    }
  }
  if (value instanceof MsgpackFloat) {
    w.byte(0xcb);
    return w.put(8, "setFloat64", value.value);
  }
  if (value instanceof ArrayBuffer || ArrayBuffer.isView(value)) {
    const bytes = toBytes(value);
    if (bytes.length <= 0xff) { w.byte(0xc4); w.byte(bytes.length); }
    else if (bytes.length <= 0xffff) w.u16(0xc5, bytes.length);
    else w.u32(0xc6, bytes.length);
    return w.raw(bytes);
  }
  if (Array.isArray(value)) {
    writeLength(w, value.length, 0x90, 15, null, 0xdc, 0xdd);
    for (const item of value) writeValue(w, item, depth + 1);
    return;
  }
  const entries = value instanceof Map
    ? [...value.entries()]
    : Object.entries(value).filter(([, v]) => v !== undefined);
  writeLength(w, entries.length, 0x80, 15, null, 0xde, 0xdf);
  for (const [k, v] of entries) {
    writeValue(w, k, depth + 1);
    writeValue(w, v, depth + 1);
  }
}

/** One value as msgpack bytes. */
export function encode(value) {
  const w = new Writer();
  writeValue(w, value, 0);
  return w.result();
}

class Reader {
  constructor(bytes, options) {
    this.bytes = toBytes(bytes);
    this.view = new DataView(this.bytes.buffer, this.bytes.byteOffset, this.bytes.byteLength);
    this.pos = 0;
    this.wrapFloats = Boolean(options.wrapFloats);
  }
  take(n) {
    if (this.pos + n > this.bytes.length) throw new MsgpackError("msgpack data ends inside a value");
    const at = this.pos;
    this.pos += n;
    return at;
  }
  u8() { return this.bytes[this.take(1)]; }
  u16() { return this.view.getUint16(this.take(2)); }
  u32() { return this.view.getUint32(this.take(4)); }
  slice(n) { const at = this.take(n); return this.bytes.slice(at, at + n); }
  str(n) {
    try {
      return utf8Decoder.decode(this.bytes.subarray(this.take(n), this.pos));
    } catch {
      throw new MsgpackError("msgpack str is not valid UTF-8");
    }
  }
  float(value) { return this.wrapFloats ? new MsgpackFloat(value) : value; }
  array(n, depth) {
    const out = [];
    for (let i = 0; i < n; i++) out.push(this.value(depth + 1));
    return out;
  }
  map(n, depth) {
    const entries = [];
    for (let i = 0; i < n; i++) entries.push([this.value(depth + 1), this.value(depth + 1)]);
    if (!entries.every(([k]) => typeof k === "string")) return new Map(entries);
    const out = {};
    // defineProperty: a "__proto__" key is an ordinary member, never the object's prototype.
    for (const [k, v] of entries) Object.defineProperty(out, k, { value: v, enumerable: true, writable: true, configurable: true });
    return out;
  }
  value(depth = 0) {
    if (depth > MAX_DEPTH) throw new MsgpackError("msgpack nested too deeply");
    const b = this.u8();
    if (b <= 0x7f) return b;
    if (b >= 0xe0) return b - 0x100;
    if (b <= 0x8f) return this.map(b & 0x0f, depth);
    if (b <= 0x9f) return this.array(b & 0x0f, depth);
    if (b <= 0xbf) return this.str(b & 0x1f);
    const v = this.view;
    switch (b) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xc4: return this.slice(this.u8());
      case 0xc5: return this.slice(this.u16());
      case 0xc6: return this.slice(this.u32());
      case 0xca: return this.float(v.getFloat32(this.take(4)));
      case 0xcb: return this.float(v.getFloat64(this.take(8)));
      case 0xcc: return this.u8();
      case 0xcd: return this.u16();
      case 0xce: return this.u32();
      case 0xcf: return safeInt(v.getBigUint64(this.take(8)));
      case 0xd0: return v.getInt8(this.take(1));
      case 0xd1: return v.getInt16(this.take(2));
      case 0xd2: return v.getInt32(this.take(4));
      case 0xd3: return safeInt(v.getBigInt64(this.take(8)));
      case 0xd9: return this.str(this.u8());
      case 0xda: return this.str(this.u16());
      case 0xdb: return this.str(this.u32());
      case 0xdc: return this.array(this.u16(), depth);
      case 0xdd: return this.array(this.u32(), depth);
      case 0xde: return this.map(this.u16(), depth);
      case 0xdf: return this.map(this.u32(), depth);
    }
    throw new MsgpackError(`msgpack type 0x${b.toString(16)} is not used by the protocol`);
  }
}

function safeInt(big) {
  return big >= BigInt(Number.MIN_SAFE_INTEGER) && big <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(big) : big;
}

/** Exactly one msgpack value; trailing bytes are an error. */
export function decode(bytes, options = {}) {
  const reader = new Reader(bytes, options);
  const value = reader.value();
  if (reader.pos !== reader.bytes.length) throw new MsgpackError("extra bytes after the msgpack value");
  return value;
}

/** Every value of msgpack data holding several back to back (§4: stanzas in one message). */
export function decodeAll(bytes, options = {}) {
  const reader = new Reader(bytes, options);
  const values = [];
  while (reader.pos < reader.bytes.length) values.push(reader.value());
  return values;
}

// ------------------------------------------------------------------- primitives (WebCrypto)

async function sha256(data) {
  return new Uint8Array(await subtle.digest("SHA-256", data));
}

async function hmacSha256(key, data) {
  const hmacKey = await subtle.importKey("raw", key, { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  return new Uint8Array(await subtle.sign("HMAC", hmacKey, data));
}

// Noise §4.3: HKDF(chaining_key, input_key_material, num_outputs) with HMAC-SHA256.
async function hkdf(chainingKey, inputKeyMaterial, numOutputs) {
  const tempKey = await hmacSha256(chainingKey, inputKeyMaterial);
  const output1 = await hmacSha256(tempKey, Uint8Array.of(0x01));
  const output2 = await hmacSha256(tempKey, concat(output1, Uint8Array.of(0x02)));
  if (numOutputs === 2) return [output1, output2];
  const output3 = await hmacSha256(tempKey, concat(output2, Uint8Array.of(0x03)));
  return [output1, output2, output3];
}

// PKCS#8 wrapping of a raw X25519 private key (RFC 8410): WebCrypto imports private keys only so.
const PKCS8_X25519_PREFIX = fromHex("302e020100300506032b656e04220420");
const X25519_BASE_POINT = Uint8Array.of(9, ...new Uint8Array(31));

/** A Curve25519 key pair: a WebCrypto private key and the 32-byte public key. */
export class KeyPair {
  constructor(privateKey, publicKey) {
    this.privateKey = privateKey;
    this.publicKey = publicKey; // Uint8Array(32)
  }

  /** Noise GENERATE_KEYPAIR(). The private key is not extractable. */
  static async generate() {
    const pair = await subtle.generateKey({ name: "X25519" }, false, ["deriveBits"]);
    return new KeyPair(pair.privateKey, new Uint8Array(await subtle.exportKey("raw", pair.publicKey)));
  }

  /** A key pair from 32 raw private-key bytes (test vectors, or a device key kept by the app). */
  static async fromPrivate(privateBytes) {
    const raw = toBytes(privateBytes);
    if (raw.length !== DHLEN) throw new TypeError(`an X25519 private key is ${DHLEN} bytes`);
    const privateKey = await subtle.importKey("pkcs8", concat(PKCS8_X25519_PREFIX, raw), { name: "X25519" }, false, ["deriveBits"]);
    // The public key is X25519(private, 9): the same primitive, with the base point.
    return new KeyPair(privateKey, await dh(privateKey, X25519_BASE_POINT));
  }
}

// Noise DH(key_pair, public_key). WebCrypto refuses an all-zero result (a low-order point).
async function dh(privateKey, publicBytes) {
  const publicKey = await subtle.importKey("raw", publicBytes, { name: "X25519" }, false, []);
  return new Uint8Array(await subtle.deriveBits({ name: "X25519", public: publicKey }, privateKey, 8 * DHLEN));
}

// ------------------------------------------------------------------------------ Noise (§2)

/** Noise §5.1 CipherState with AESGCM (§12.4 there): the nonce is 4 zero bytes, then the
 * 64-bit counter big-endian (docs/protocol.md §2 "Transport messages"). */
export class CipherState {
  constructor() {
    this.key = null; // a WebCrypto AES-GCM key, or null (empty)
    this.n = 0;
  }

  async initializeKey(keyBytes) {
    this.key = await subtle.importKey("raw", keyBytes, { name: "AES-GCM" }, false, ["encrypt", "decrypt"]);
    this.n = 0;
  }

  hasKey() {
    return this.key !== null;
  }

  // The counter is taken before the await, so calls that overlap still use distinct nonces.
  // A failed decryption ends the session (§1), so the counter is not given back.
  nextNonce() {
    if (this.n >= Number.MAX_SAFE_INTEGER) throw new InterlinkError("protocol", "nonce space exhausted");
    const iv = new Uint8Array(12);
    new DataView(iv.buffer).setBigUint64(4, BigInt(this.n++));
    return iv;
  }

  async encryptWithAd(ad, plaintext) {
    if (!this.hasKey()) return plaintext;
    const params = { name: "AES-GCM", iv: this.nextNonce(), additionalData: ad, tagLength: 8 * TAGLEN };
    return new Uint8Array(await subtle.encrypt(params, this.key, plaintext));
  }

  async decryptWithAd(ad, ciphertext) {
    if (!this.hasKey()) return ciphertext;
    const params = { name: "AES-GCM", iv: this.nextNonce(), additionalData: ad, tagLength: 8 * TAGLEN };
    try {
      return new Uint8Array(await subtle.decrypt(params, this.key, ciphertext));
    } catch {
      throw new InterlinkError("bad_frame", "a message failed to decrypt (its tag does not verify)");
    }
  }
}

/** Noise §5.2 SymmetricState with SHA-256. */
class SymmetricState {
  static async initialize(protocolName) {
    const state = new SymmetricState();
    const name = utf8Encoder.encode(protocolName);
    // h = protocol_name padded with zeros to HASHLEN, or HASH(protocol_name) if longer.
    state.h = name.length <= HASHLEN ? concat(name, new Uint8Array(HASHLEN - name.length)) : await sha256(name);
    state.ck = state.h;
    state.cipher = new CipherState();
    return state;
  }

  async mixKey(inputKeyMaterial) {
    const [ck, tempK] = await hkdf(this.ck, inputKeyMaterial, 2);
    this.ck = ck;
    await this.cipher.initializeKey(tempK); // HASHLEN is 32: no truncation needed
  }

  async mixHash(data) {
    this.h = await sha256(concat(this.h, data));
  }

  async encryptAndHash(plaintext) {
    const ciphertext = await this.cipher.encryptWithAd(this.h, plaintext);
    await this.mixHash(ciphertext);
    return ciphertext;
  }

  async decryptAndHash(ciphertext) {
    const plaintext = await this.cipher.decryptWithAd(this.h, ciphertext);
    await this.mixHash(ciphertext);
    return plaintext;
  }

  async split() {
    const [k1, k2] = await hkdf(this.ck, EMPTY, 2);
    const c1 = new CipherState();
    const c2 = new CipherState();
    await c1.initializeKey(k1);
    await c2.initializeKey(k2);
    return [c1, c2];
  }
}

/** Noise §5.3 HandshakeState for the initiator of XX (the client is always the initiator, §2):
 *
 *   -> e                 message 1, payload empty
 *   <- e, ee, s, es      message 2, payload: the server hello
 *   -> s, se             message 3, payload: the client auth
 *
 * Written out token by token for this one pattern. After message 3, `send` and `receive` are
 * the transport CipherStates and `handshakeHash` is h. */
export class NoiseXXInitiator {
  /** `staticKey`/`ephemeralKey`: KeyPairs (the ephemeral is fixed only by test vectors). */
  static async create({ prologue, staticKey, ephemeralKey = null }) {
    const hs = new NoiseXXInitiator();
    hs.ss = await SymmetricState.initialize(PROTOCOL_NAME);
    await hs.ss.mixHash(toBytes(prologue)); // XX has no pre-messages
    hs.s = staticKey;
    hs.e = ephemeralKey;
    hs.re = null;
    hs.rs = null;
    hs.step = 1;
    return hs;
  }

  expect(step) {
    if (this.step !== step) throw new InterlinkError("handshake", `handshake message ${step} out of turn`);
    this.step = -1; // any failure from here on kills the handshake
  }

  /** Message 1: -> e */
  async writeMessage1(payload = EMPTY) {
    this.expect(1);
    if (this.e === null) this.e = await KeyPair.generate();
    await this.ss.mixHash(this.e.publicKey);
    const message = concat(this.e.publicKey, await this.ss.encryptAndHash(toBytes(payload)));
    this.step = 2;
    return message;
  }

  /** Message 2: <- e, ee, s, es. Returns the payload; `remoteStatic` is then the responder's s. */
  async readMessage2(message) {
    this.expect(2);
    message = toBytes(message);
    if (message.length < DHLEN + DHLEN + TAGLEN + TAGLEN || message.length > MAX_MESSAGE) {
      throw new InterlinkError("handshake", `handshake message 2 has an impossible length (${message.length} bytes)`);
    }
    try {
      this.re = message.slice(0, DHLEN); // e
      await this.ss.mixHash(this.re);
      await this.ss.mixKey(await dh(this.e.privateKey, this.re)); // ee
      const encryptedStatic = message.slice(DHLEN, DHLEN + DHLEN + TAGLEN); // s (encrypted: k is set)
      this.rs = await this.ss.decryptAndHash(encryptedStatic);
      await this.ss.mixKey(await dh(this.e.privateKey, this.rs)); // es (initiator: DH(e, rs))
      const payload = await this.ss.decryptAndHash(message.slice(DHLEN + DHLEN + TAGLEN));
      this.step = 3;
      return payload;
    } catch (error) {
      throw new InterlinkError("handshake", `handshake message 2 refused: ${error.message}`);
    }
  }

  get remoteStatic() {
    return this.rs;
  }

  /** Message 3: -> s, se. Completes the handshake (Split: the initiator sends with c1). */
  async writeMessage3(payload) {
    this.expect(3);
    const encryptedStatic = await this.ss.encryptAndHash(this.s.publicKey); // s
    await this.ss.mixKey(await dh(this.s.privateKey, this.re)); // se (initiator: DH(s, re))
    const message = concat(encryptedStatic, await this.ss.encryptAndHash(toBytes(payload)));
    if (message.length > MAX_MESSAGE) throw new InterlinkError("handshake", "handshake message 3 is too large");
    [this.send, this.receive] = await this.ss.split();
    this.handshakeHash = this.ss.h;
    this.ss = null; // the handshake state is done with (Noise §5.3)
    this.step = 4;
    return message;
  }
}

// ------------------------------------------------------------------ server hello (§2)

function field(map, name, kind, what) {
  const present = map instanceof Map ? map.has(name) : Object.hasOwn(map, name);
  if (!present) throw new InterlinkError("certificate", `${what} lacks field '${name}'`);
  const value = map instanceof Map ? map.get(name) : map[name];
  const ok = kind === "bin" ? value instanceof Uint8Array
    : kind === "str" ? typeof value === "string"
    : (typeof value === "number" && Number.isInteger(value)) || typeof value === "bigint"; // int (never bool or float)
  if (!ok) throw new InterlinkError("certificate", `${what} field '${name}' must be ${kind}`);
  return value;
}

function decodeMap(bytes, what) {
  let value;
  try {
    value = decode(bytes, { wrapFloats: true });
  } catch (error) {
    throw new InterlinkError("certificate", `${what} is not valid msgpack: ${error.message}`);
  }
  if (value === null || typeof value !== "object" || Array.isArray(value) || value instanceof Uint8Array || value instanceof MsgpackFloat) {
    throw new InterlinkError("certificate", `${what} must be a msgpack map`);
  }
  return value;
}

/** Check the server hello against the pinned operator root key, as docs/protocol.md §2 asks
 * (and core/protocol/certs.py verify_server_hello does): the Ed25519 signature over
 * "interlink-node-cert-v1" + cert verifies under `rootPublic`, v is 1, key equals the Noise
 * remote static key, and nbf <= now <= exp (`now` in Unix seconds). Returns the certificate's
 * fields; throws InterlinkError "certificate" otherwise. The hello's own node/time are unsigned
 * and only type-checked. */
export async function verifyServerHello(payload, { rootPublic, remoteStatic, now }) {
  const hello = decodeMap(payload, "server hello");
  const certBytes = field(hello, "cert", "bin", "server hello");
  const sig = field(hello, "sig", "bin", "server hello");
  field(hello, "node", "str", "server hello");
  field(hello, "time", "int", "server hello");
  if (sig.length !== SIGNATURE_BYTES) {
    throw new InterlinkError("certificate", `certificate signature must be ${SIGNATURE_BYTES} bytes, got ${sig.length}`);
  }
  let verified = false;
  try {
    const root = await subtle.importKey("raw", toBytes(rootPublic), { name: "Ed25519" }, false, ["verify"]);
    verified = await subtle.verify({ name: "Ed25519" }, root, sig, concat(CERT_CONTEXT, certBytes));
  } catch {
    verified = false;
  }
  if (!verified) {
    throw new InterlinkError("certificate",
      `node certificate signature does not verify under the pinned root key ${toHex(rootPublic)}`);
  }
  const cert = decodeMap(certBytes, "node certificate");
  const v = field(cert, "v", "int", "node certificate");
  if (v !== 1) throw new InterlinkError("certificate", `unsupported node certificate version ${v} (expected 1)`);
  const key = field(cert, "key", "bin", "node certificate");
  const node = field(cert, "node", "str", "node certificate");
  const nbf = field(cert, "nbf", "int", "node certificate");
  const exp = field(cert, "exp", "int", "node certificate");
  if (key.length !== DHLEN) throw new InterlinkError("certificate", `node certificate 'key' must be ${DHLEN} bytes`);
  if (!equalBytes(key, toBytes(remoteStatic))) {
    throw new InterlinkError("certificate", "node certificate key does not match the Noise remote static key");
  }
  if (now < nbf) throw new InterlinkError("certificate", `node certificate for '${node}' is not valid yet (nbf ${nbf}, now ${Math.floor(now)})`);
  if (now > exp) throw new InterlinkError("certificate", `node certificate for '${node}' expired (exp ${exp}, now ${Math.floor(now)})`);
  return { node, key, notBefore: nbf, expires: exp };
}

// ---------------------------------------------------------------------------- the client

const CLOSED = Symbol("closed");

/** WebSocket messages in arrival order, handed out one at a time. */
class Inbox {
  constructor() {
    this.items = [];
    this.waiting = null;
    this.ended = false;
  }
  push(item) {
    if (this.ended) return;
    if (this.waiting) {
      const resolve = this.waiting;
      this.waiting = null;
      resolve(item);
    } else this.items.push(item);
  }
  end() {
    this.push(CLOSED);
    this.ended = true;
  }
  next() {
    if (this.items.length) return Promise.resolve(this.items.shift());
    return new Promise((resolve) => { this.waiting = resolve; });
  }
  /** True when next() has something at once. */
  get ready() {
    return this.items.length > 0;
  }
}

function normalizeRoot(rootPublic) {
  let bytes;
  if (typeof rootPublic === "string") bytes = /^[0-9a-fA-F]{64}$/.test(rootPublic) ? fromHex(rootPublic) : fromBase64(rootPublic);
  else bytes = toBytes(rootPublic);
  if (bytes.length !== 32) throw new TypeError("rootPublic must be the operator's 32-byte Ed25519 root public key (bytes, hex or base64url)");
  return bytes;
}

/** §6: `c` (and `own`) as a Map from device number to bytes; strings are sent as their UTF-8. */
function devicesMap(byDevice) {
  const entries = byDevice instanceof Map ? [...byDevice.entries()] : Object.entries(byDevice);
  return new Map(entries.map(([device, bytes]) => {
    const number = Number(device);
    if (!Number.isInteger(number) || number < 1 || number > 0x7fffffff) throw new TypeError(`not a device number: ${device}`);
    return [number, toBytes(bytes)];
  }));
}

function randomId() {
  return globalThis.crypto.getRandomValues(new Uint8Array(16)); // §6: 16 random bytes per message
}

/** Open a session: the WebSocket, the preamble, the Noise XX handshake with the pinned root,
 * authentication; resolves once the gateway's `welcome` arrived (§1-§3), with an
 * InterlinkClient. What arrived right behind the welcome is read first: if the gateway already
 * ended the session (a `bye`, or the close, §5), connect rejects instead ("bye" or "closed").
 * A cluster node's `bye` `redirect` is followed to the user's home node (its `ws` URL).
 * Options:
 *   url         ws:// or wss:// URL of the gateway's WebSocket listener (…/interlink)
 *   token       the provider's JWT for this user (§3)
 *   device      this client's device number, 1..2^31-1
 *   rootPublic  the operator's root public key, pinned: 32 bytes, or hex, or base64url
 *   agent       a short client name operators see (default "interlink-web")
 *   staticKey   a KeyPair to keep per device (tokens may bind it, §3 `cnf`); default: a new one
 *   timeoutMs   for connecting and for each answer awaited (default 10000)
 *   onStatus    called with a short text at each step (for a status line)
 *   now         () => Unix ms, for the certificate's validity window (default Date.now)
 *   WebSocket   a WebSocket constructor (default globalThis.WebSocket) */
export async function connect(options) {
  // A gateway that is one node of a cluster may answer `bye` `redirect` instead of `welcome`
  // (§5): the user's home is another node; connect there, at its `ws` URL (at most twice).
  for (let hops = 0; ; hops++) {
    const client = new InterlinkClient(options);
    try {
      await client._open();
      return client;
    } catch (error) {
      const bye = error instanceof InterlinkError && error.code === "bye" ? error.stanza : undefined;
      if (hops >= MAX_REDIRECTS || bye?.reason !== "redirect" || typeof bye.ws !== "string"
          || !/^wss?:\/\//.test(bye.ws)) throw error;
      options = { ...options, url: bye.ws };
    }
  }
}

const MAX_REDIRECTS = 2;

export class InterlinkClient {
  constructor({ url, token, device, rootPublic, agent = "interlink-web", staticKey = null, timeoutMs = 10000,
    onStatus = null, now = () => Date.now(), WebSocket = globalThis.WebSocket }) {
    if (typeof url !== "string" || typeof token !== "string") throw new TypeError("url and token must be strings");
    if (!Number.isInteger(device) || device < 1 || device > 0x7fffffff) throw new TypeError("device must be an integer 1..2^31-1");
    this._options = { url, token, device, agent, staticKey, timeoutMs, now, WebSocket };
    this._root = normalizeRoot(rootPublic);
    this._onStatus = onStatus;
    this._inbox = new Inbox();
    this._reading = false; // true while someone reads the inbox to its end (and then calls _finish)
    this._outbox = []; // encoded stanzas waiting for the next transport message
    this._flushing = null;
    this._maxPlaintext = MAX_MESSAGE - TAGLEN; // until welcome announces less (§4 limits.max_frame)
    this._pending = new Map(); // "ack:<id hex>" | "iq:<id>" | "ping:<id>" -> {resolve, reject, timer}
    this._nextId = 1;
    this._seen = new Set(); // (from, id) of recent deliveries: §6 says delivery is at least once
    this._queued = []; // dlv waiting for onMessage or the iterator
    this._readers = [];
    this._onMessage = null;
    this._onClose = null;
    this.onState = null; // (stanza) => {} for typing state (§6)
    this.onError = null; // (InterlinkError) => {} for an `err` that answers nothing of ours
    this.welcome = null;
    this.certificate = null;
    this.closed = false;
    this.closeInfo = null;
    this._closedPromise = new Promise((resolve) => { this._resolveClosed = resolve; });
  }

  get user() { return this.welcome?.user; }
  get device() { return this.welcome?.device; }
  get limits() { return this.welcome?.limits ?? {}; }

  /** The callback for each delivery (`dlv`, §6: messages, receipts, group events). Deliveries
   * that arrived before it was set are handed to it at once. Without one, iterate the client:
   * `for await (const dlv of client) …`. Either way each is confirmed with `recv`. */
  get onMessage() { return this._onMessage; }
  set onMessage(callback) {
    this._onMessage = callback;
    while (callback && this._queued.length) this._callback(this._queued.shift());
  }

  /** ({code, reason, bye, error}) => {} once the session ended. Set on a session that has
   * already ended, it is called at once. */
  get onClose() { return this._onClose; }
  set onClose(callback) {
    this._onClose = callback;
    if (callback && this.closed) this._notify("onClose", callback, this.closeInfo);
  }

  // An application callback: whatever it throws is reported, never the end of the session.
  _notify(name, callback, value) {
    try {
      callback?.(value);
    } catch (error) {
      console.error(`interlink: ${name} threw`, error);
    }
  }

  _status(text) {
    this._notify("onStatus", this._onStatus, text);
  }

  // -- connecting (§1-§3)

  async _open() {
    const { url, timeoutMs, WebSocket: Socket } = this._options;
    const timer = setTimeout(() => this._abort(new InterlinkError("timeout", `no welcome within ${timeoutMs} ms`)), timeoutMs);
    // The handshake reads the inbox (and finishes the session once the close arrives), as the
    // read loop does later: messages already queued (welcome, then a bye) are read in order.
    this._reading = true;
    try {
      this._status("connecting");
      const ws = new Socket(url);
      this._ws = ws;
      ws.binaryType = "arraybuffer";
      ws.onmessage = (event) => {
        if (!(event.data instanceof ArrayBuffer)) {
          this._abort(new InterlinkError("protocol", "the gateway sent a text message (§1: binary only)"));
        } else if (event.data.byteLength > MAX_MESSAGE) {
          // §1: a message holds at most 65535 bytes; the gateway refuses larger ones (1009), so do we.
          this._abort(new InterlinkError("bad_frame", `the gateway sent a message of ${event.data.byteLength} bytes (§1: at most ${MAX_MESSAGE})`));
        } else this._inbox.push(new Uint8Array(event.data));
      };
      ws.onclose = (event) => {
        this._wsClose = { code: event.code, reason: event.reason };
        this._inbox.end();
        if (!this._reading) this._finish(); // else the reader finishes once it has read the rest
      };
      ws.onerror = () => {}; // a close event follows
      await new Promise((resolve, reject) => {
        ws.onopen = resolve;
        ws.addEventListener("close", () => reject(new InterlinkError("closed", `cannot open ${url}`)));
      });
      await this._handshake();
      // What arrived right behind the welcome is read before connect resolves: a gateway may
      // say bye and close at once (§5), and connect must not hand out a session already over.
      while (this._inbox.ready && !this._bye) {
        const message = await this._inbox.next();
        if (message === CLOSED) throw this._endError();
        this._handle(await this._decrypt(message));
      }
      if (this._bye) throw this._endError();
    } catch (error) {
      this._reading = false;
      this._abort(error);
      await this._closedPromise;
      throw this.closeInfo.error ?? error;
    } finally {
      clearTimeout(timer);
    }
    this._readLoop(); // from now on every message is read there
  }

  async _next(what) {
    const message = await this._inbox.next();
    if (message === CLOSED) {
      const c = this._wsClose ?? {};
      throw new InterlinkError("closed", `the gateway closed the connection while waiting for ${what}` +
        (c.code ? ` (WebSocket close ${c.code}${c.reason ? ` ${c.reason}` : ""})` : ""));
    }
    return message;
  }

  async _handshake() {
    const { token, device, agent, now } = this._options;
    this._status("handshake");
    const staticKey = this._options.staticKey ?? await KeyPair.generate();
    const noise = await NoiseXXInitiator.create({ prologue: PREAMBLE, staticKey });
    // §1 over WebSocket: the preamble is the first binary message, then one Noise message each.
    this._ws.send(PREAMBLE);
    this._ws.send(await noise.writeMessage1());
    const hello = await noise.readMessage2(await this._next("the server hello"));
    // §2: abort unless the node certificate is signed by the pinned operator root.
    this.certificate = await verifyServerHello(hello, { rootPublic: this._root, remoteStatic: noise.remoteStatic, now: now() / 1000 });
    this._status(`gateway certified by the pinned root (node ${this.certificate.node}); authenticating`);
    this._ws.send(await noise.writeMessage3(encode({ token, device, agent }))); // §2 client auth
    this._send = noise.send;
    this._receive = noise.receive;
    this.handshakeHash = noise.handshakeHash;
    // §2: the gateway's first transport message is `welcome`, or `err` and the close.
    const stanzas = await this._decrypt(await this._next("welcome"));
    const first = stanzas.shift();
    if (!first) throw new InterlinkError("protocol", "expected welcome, got an empty message");
    if (first.t === "err") throw errorOf(first);
    if (first.t === "bye") {
      this._onBye(first);
      throw this._endError();
    }
    if (first.t !== "welcome") throw new InterlinkError("protocol", `expected welcome, got ${first.t}`);
    // §4: `user` is an address and `device` an int; a welcome without them is unusable.
    if (typeof first.user !== "string" || !Number.isInteger(first.device)) {
      throw new InterlinkError("protocol", "the gateway's welcome lacks a str 'user' or an int 'device'");
    }
    this.welcome = first;
    // §1/§4: never send a message larger than the gateway's limits.max_frame, when it is a
    // usable int (as the Python client adopts it), nor ever one over 65535 bytes.
    const maxFrame = first.limits?.max_frame;
    if (Number.isInteger(maxFrame) && maxFrame > TAGLEN) this._maxPlaintext = Math.min(MAX_MESSAGE, maxFrame) - TAGLEN;
    const pending = Number.isInteger(first.pending) && first.pending > 0 ? `, ${first.pending} waiting` : "";
    this._status(`welcome ${first.user}, device ${first.device}${pending}`);
    this._handle(stanzas); // what came with the welcome (stored items are pushed right after it, §6)
  }

  async _decrypt(message) {
    const plaintext = await this._receive.decryptWithAd(EMPTY, message);
    try {
      const stanzas = decodeAll(plaintext);
      if (!stanzas.every((s) => s !== null && typeof s === "object" && typeof s.t === "string")) throw new Error("not a stanza map");
      return stanzas;
    } catch (error) {
      throw new InterlinkError("bad_frame", `the gateway sent an unreadable message: ${error.message}`);
    }
  }

  // -- receiving (§4, §6)

  async _readLoop() {
    try {
      for (;;) {
        const message = await this._inbox.next();
        if (message === CLOSED) break;
        if (this._bye) continue; // §5: nothing counts after bye; wait for the close
        this._handle(await this._decrypt(message));
      }
    } catch (error) {
      this._reading = false;
      this._abort(error);
      return;
    }
    this._reading = false;
    this._finish();
  }

  // Each stanza's fields are checked before use (§4, §6): an ack, res or pong without a usable
  // id matches no request and is ignored, as the Python client does.
  _handle(stanzas) {
    const seqs = [];
    for (const stanza of stanzas) {
      switch (stanza.t) {
        case "dlv":
          if (isInt(stanza.seq)) seqs.push(stanza.seq); // only ints go back in recv
          this._deliver(stanza);
          break;
        case "ack":
          if (stanza.id instanceof Uint8Array) this._settle(`ack:${toHex(stanza.id)}`, stanza);
          break;
        case "res":
          if (Number.isInteger(stanza.id)) this._settle(`iq:${stanza.id}`, stanza);
          break;
        case "pong":
          if (Number.isInteger(stanza.id)) this._settle(`ping:${stanza.id}`, stanza);
          break;
        case "err": {
          // §4: `ref` answers a msg/rcpt, `id` an iq. One that answers no request waiting here
          // (none, malformed, or late) goes to onError, as the Python client hands it to the app.
          const error = errorOf(stanza);
          const key = stanza.ref instanceof Uint8Array ? `ack:${toHex(stanza.ref)}`
            : Number.isInteger(stanza.id) ? `iq:${stanza.id}` : null;
          if (key !== null && this._pending.has(key)) this._settle(key, null, error);
          else this._notify("onError", this.onError, error);
          break;
        }
        case "state":
          this._notify("onState", this.onState, stanza);
          break;
        case "bye": // §5: the session is over; the gateway closes after it
          this._onBye(stanza);
          return; // no recv either: what was delivered comes again next session (§6)
      }
    }
    // §6: recv with their seqs deletes the items and lets more come (one recv per message read).
    if (seqs.length && !this.closed && !this._closing) this._sendStanza({ t: "recv", seq: seqs });
  }

  _deliver(dlv) {
    // §6: drop duplicates by (from, id); one without a str from and a bin id is handed out as it is.
    if (typeof dlv.from === "string" && dlv.id instanceof Uint8Array) {
      const key = `${dlv.from}/${toHex(dlv.id)}`;
      if (this._seen.has(key)) return; // a redelivery
      this._seen.add(key);
      if (this._seen.size > 4096) this._seen.delete(this._seen.values().next().value);
    }
    if (this._onMessage) this._callback(dlv);
    else if (this._readers.length) this._readers.shift()({ value: dlv, done: false });
    else this._queued.push(dlv);
  }

  _callback(dlv) {
    this._notify("onMessage", this._onMessage, dlv);
  }

  /** `for await (const dlv of client)`: deliveries until the session ends. */
  [Symbol.asyncIterator]() {
    return {
      next: () => {
        if (this._queued.length) return Promise.resolve({ value: this._queued.shift(), done: false });
        if (this.closed) return Promise.resolve({ value: undefined, done: true });
        return new Promise((resolve) => this._readers.push(resolve));
      },
      return: () => Promise.resolve({ value: undefined, done: true }),
    };
  }

  /** The next delivery (§6), waiting up to timeoutMs (for clients without onMessage). */
  nextMessage(timeoutMs = this._options.timeoutMs) {
    if (this._queued.length) return Promise.resolve(this._queued.shift());
    if (this.closed) return Promise.reject(new InterlinkError("closed", "the session ended"));
    return new Promise((resolve, reject) => {
      const reader = ({ value, done }) => {
        clearTimeout(timer);
        if (done) reject(new InterlinkError("closed", "the session ended"));
        else resolve(value);
      };
      const timer = setTimeout(() => {
        this._readers = this._readers.filter((r) => r !== reader);
        reject(new InterlinkError("timeout", `no delivery within ${timeoutMs} ms`));
      }, timeoutMs);
      this._readers.push(reader);
    });
  }

  // -- sending (§4: stanzas back to back in transport messages)

  /** Send any stanza (a plain object; use a Map for maps with int keys). */
  sendStanza(stanza) {
    this._checkOpen();
    this._sendStanza(stanza);
  }

  _sendStanza(stanza) {
    const bytes = encode(stanza);
    if (bytes.length > this._maxPlaintext) throw new InterlinkError("too_large", `a stanza of ${bytes.length} bytes does not fit one message`);
    this._outbox.push(bytes);
    // From the next microtask on: stanzas queued in the same turn leave together.
    if (!this._flushing) this._flushing = Promise.resolve().then(() => this._flush());
  }

  // Queued stanzas leave in as few transport messages as fit (at most 256 and one frame each).
  async _flush() {
    try {
      while (this._outbox.length && !this.closed && !this._bye) {
        const batch = [];
        let size = 0;
        while (this._outbox.length && batch.length < MAX_STANZAS_PER_MESSAGE && size + this._outbox[0].length <= this._maxPlaintext) {
          size += this._outbox[0].length;
          batch.push(this._outbox.shift());
        }
        if (!batch.length) batch.push(this._outbox.shift()); // (cannot happen: sizes are checked when queued)
        const message = await this._send.encryptWithAd(EMPTY, concat(...batch));
        if (this._ws.readyState === 1 && !this._bye) this._ws.send(message);
      }
    } catch (error) {
      this._abort(error);
    } finally {
      this._flushing = null;
    }
  }

  _checkOpen() {
    if (this.closed || this._closing || !this.welcome) {
      const why = this._error ?? (this._bye ? this._endError() : null);
      throw new InterlinkError("closed", why ? `the session is over: ${why.message}` : "the session is not open");
    }
  }

  // Queue `stanza` and wait for its answer (the answer cannot arrive before this returns).
  _await(key, stanza) {
    this._checkOpen();
    this._sendStanza(stanza);
    return new Promise((resolve, reject) => {
      const timeoutMs = this._options.timeoutMs;
      const timer = setTimeout(() => this._settle(key, null, new InterlinkError("timeout", `no answer within ${timeoutMs} ms`)), timeoutMs);
      this._pending.set(key, { resolve, reject, timer });
    });
  }

  _settle(key, value, error = null) {
    const waiter = this._pending.get(key);
    if (!waiter) return;
    this._pending.delete(key);
    clearTimeout(waiter.timer);
    if (error) waiter.reject(error);
    else waiter.resolve(value);
  }

  _rejectAll(error) {
    for (const key of [...this._pending.keys()]) this._settle(key, null, error);
  }

  /** §6: a 1:1 message, one ciphertext per device of `to` ({1: bytes, 2: bytes} or a Map).
   * Resolves with the `ack` once the gateway stored it; rejects with the `err` (e.g.
   * "device_mismatch": see error.stanza.missing / .extra). Options: own, id. */
  async sendMessage(to, bytesByDevice, { own = null, id = randomId() } = {}) {
    const stanza = { t: "msg", id: toBytes(id), to, c: devicesMap(bytesByDevice) };
    if (own) stanza.own = devicesMap(own);
    return this._await(`ack:${toHex(stanza.id)}`, stanza);
  }

  /** Same as sendMessage. */
  async send(to, bytesByDevice, options) {
    return this.sendMessage(to, bytesByDevice, options);
  }

  /** Text to every device of `to` (devices.get, §7), the same bytes for each. A real app
   * encrypts per device (Signal); the gateway never reads `c` either way. */
  async sendText(to, text) {
    const devices = await this.devices(to);
    const bytes = utf8Encoder.encode(text);
    return this.sendMessage(to, new Map(devices.map((device) => [device, bytes])));
  }

  /** §7: an operation; resolves with the `res` stanza. */
  async iq(op, fields = {}) {
    const id = this._nextId++;
    return this._await(`iq:${id}`, { ...fields, t: "iq", id, op });
  }

  /** §7 devices.get: the device numbers of `user`. */
  async devices(user) {
    const { devices } = await this.iq("devices.get", { user });
    if (!Array.isArray(devices) || !devices.every((d) => Number.isInteger(d) && d >= 1 && d <= 0x7fffffff)) {
      throw new InterlinkError("protocol", "devices.get answered without a list of device numbers");
    }
    return devices;
  }

  /** §4: a ping; resolves with the round trip in milliseconds. */
  async ping() {
    const id = this._nextId++;
    const started = performance.now();
    await this._await(`ping:${id}`, { t: "ping", id });
    return performance.now() - started;
  }

  /** Close the session; resolves once the WebSocket is closed (or after 3 s without an answer). */
  async close() {
    if (!this.closed && !this._closing) {
      this._closing = true;
      if (this._flushing) await this._flushing; // let queued stanzas (recv) leave first
      this._closeSocket("client closed");
    }
    await this._closedPromise;
  }

  // -- ending

  // §5: after bye the session is over: nothing more is sent, what waits for an answer is
  // refused with the bye's reason, and the client closes (the Python client ends it the same way).
  _onBye(stanza) {
    this._byeStanza = stanza;
    this._bye = describe(stanza.reason);
    this._closing = true;
    this._outbox.length = 0;
    this._rejectAll(this._endError());
    this._closeSocket("bye");
  }

  // Close the WebSocket; _finish follows on its close event, or after CLOSE_WAIT_MS without one.
  _closeSocket(reason) {
    const ws = this._ws;
    if (ws && ws.readyState <= 1) ws.close(1000, reason); // (browsers allow only 1000 and 3000-4999 here)
    else this._inbox.end();
    if (!ws || (this._wsClose && !this._reading)) this._finish(); // no close event is coming, nor a reader to finish
    else if (!this._wsClose) this._lastResort ??= setTimeout(() => this._finish(), CLOSE_WAIT_MS);
  }

  _abort(error) {
    if (this.closed) return;
    this._error ??= error;
    this._closing = true;
    this._closeSocket("client aborted");
  }

  // Why the session ended, when no error of this client's ended it.
  _endError() {
    if (this._bye) return new InterlinkError("bye", `gateway said bye: ${this._bye}`, this._byeStanza);
    const c = this._wsClose ?? {};
    return new InterlinkError("closed", `connection closed${c.code ? ` (WebSocket close ${c.code})` : ""}`);
  }

  _finish() {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this._lastResort);
    this._inbox.end();
    const c = this._wsClose ?? {};
    this.closeInfo = { code: c.code, reason: c.reason, bye: this._bye ?? null, error: this._error ?? null };
    this._rejectAll(this._error ?? this._endError());
    for (const resolve of this._readers.splice(0)) resolve({ value: undefined, done: true });
    this._status(this._error ? `error: ${this._error.message}` : this._bye ? `closed: bye ${this._bye}` : "closed");
    this._notify("onClose", this._onClose, this.closeInfo);
    this._resolveClosed();
  }
}

/** The InterlinkError of an `err` stanza (§5), whatever its fields hold. */
function errorOf(stanza) {
  const msg = typeof stanza.msg === "string" ? stanza.msg : "";
  if (typeof stanza.code !== "string") {
    return new InterlinkError("protocol", `the gateway sent an err without a str code (${describe(stanza.code)}): ${msg}`, stanza);
  }
  return new InterlinkError(stanza.code, `${stanza.code}: ${msg}`, stanza);
}
