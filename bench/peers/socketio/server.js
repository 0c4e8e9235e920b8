// The bench's peer: the kit's built-in chat (app.handlers:chat) on Socket.IO, one process
// of N on a host, behind the same nginx site as the kit's instances.
//
//   PEER_PORT=9001 PEER_REDIS_URL=redis://10.213.0.11:6379 node server.js
//
// A room per connection, named by the handshake's ?room= (Socket.IO has one path,
// /socket.io/, so the room cannot be the path as it is for the kit's /ws/<room>); every
// message a member sends goes to every member of the room on every process, the sender
// too, through the Redis Streams adapter. Each member is first told {instance}
// ("hello"), as the kit's chat does, so the load clients can tell where a delivery went.
//
// The settings are those Socket.IO's documentation gives for production; each is named in
// docs/sizing.md (Against Socket.IO with Redis) with why.
"use strict";

const http = require("node:http");
const os = require("node:os");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-streams-adapter");
const { createClient } = require("redis");

const port = Number(process.env.PEER_PORT || 9001);
const host = process.env.PEER_LISTEN || "127.0.0.1";
const redisUrl = process.env.PEER_REDIS_URL || "redis://127.0.0.1:6379";
// How long a disconnected client's session and missed packets are kept: Socket.IO's
// default (2 minutes), what its documentation shows.
const maxDisconnection = Number(process.env.PEER_MAX_DISCONNECTION_MS || 120000);
const instance = `${os.hostname()}:${port}`;

async function main() {
  const redis = createClient({ url: redisUrl });
  redis.on("error", (error) => console.error(`redis: ${error.message}`));
  await redis.connect();

  let closing = false;
  // /healthz for the bench (the instance's own port, as the kit's): its open
  // connections, and 503 once it is shutting down.
  const server = http.createServer((request, response) => {
    if (request.url === "/healthz") {
      response.writeHead(closing ? 503 : 200, { "Content-Type": "application/json" });
      response.end(JSON.stringify({ instance, connections: io.engine.clientsCount }));
      return;
    }
    response.writeHead(404).end();
  });

  const io = new Server(server, {
    // WebSocket only: no HTTP long-polling, so no sticky sessions are needed behind
    // nginx's least_conn, and the clients do what the kit's do (docs: "Using multiple
    // nodes", "Client options: transports").
    transports: ["websocket"],
    // The client bundle is the page's business, not the chat process's.
    serveClient: false,
    // Kept across processes and restarts in Redis Streams: the adapter the connection
    // state recovery documentation names for several nodes.
    adapter: createAdapter(redis),
    connectionStateRecovery: {
      maxDisconnectionDuration: maxDisconnection,
      // The middlewares ran when the session began (there are none here).
      skipMiddlewares: true,
    },
  });

  io.on("connection", (socket) => {
    const room = String(socket.handshake.query.room || "lobby");
    // A recovered socket is back in its rooms already (the session kept them).
    if (!socket.recovered) {
      socket.join(room);
    }
    socket.emit("hello", { instance, recovered: socket.recovered });
    socket.on("message", (text) => {
      if (typeof text === "string") {
        io.to(room).emit("message", text);
      }
    });
  });

  await new Promise((resolve) => server.listen(port, host, resolve));
  // The bench waits on this line (and on /healthz) before it sends a client here.
  console.log(`listening on ${host}:${port} as ${instance}`);

  const stop = async () => {
    if (closing) {
      return;
    }
    closing = true;
    // io.close() disconnects every socket with "server shutting down", a reason whose
    // session is kept (persistSession: a SET in Redis, not awaited by Socket.IO);
    // quit() sends its QUIT after those SETs, so they reach Redis before the exit.
    await io.close();
    await redis.quit();
    process.exit(0);
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
