//! A small blocking HTTP/1.1 client for the gateway's own API: used by the
//! `import` and `demo` commands, the load-test tools and the tests.
//!
//! Plain `http://` only, keep-alive, `Content-Length` or chunked request
//! bodies, every socket operation under a timeout.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Default timeout of each connect, read and write.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response body the client accepts.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// One response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A keep-alive connection to one server.
pub struct Client {
    addr: SocketAddr,
    host: String,
    token: Option<String>,
    timeout: Duration,
    conn: Option<BufReader<TcpStream>>,
    /// Sent with every request (name, value).
    extra_headers: Vec<(String, String)>,
}

impl Client {
    /// A client for `base`, which is `http://host:port` or `host:port`.
    pub fn new(base: &str) -> io::Result<Client> {
        let hostport = base
            .strip_prefix("http://")
            .unwrap_or(base)
            .trim_end_matches('/');
        if base.starts_with("https://") || hostport.contains('/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{base}: expected http://host:port"),
            ));
        }
        let addr = hostport.to_socket_addrs()?.next().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("{hostport}: no address"))
        })?;
        Ok(Client {
            addr,
            host: hostport.to_owned(),
            token: None,
            timeout: DEFAULT_TIMEOUT,
            conn: None,
            extra_headers: Vec::new(),
        })
    }

    /// `http://host:port` of the server this client talks to.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.host)
    }

    /// Sends `Authorization: Bearer <token>` with every request.
    pub fn with_token(mut self, token: Option<String>) -> Client {
        self.token = token.filter(|t| !t.is_empty());
        self
    }

    pub fn with_timeout(mut self, t: Duration) -> Client {
        self.timeout = t;
        self
    }

    /// Sets the headers sent with every following request (besides Host,
    /// Authorization, Content-Type and Content-Length).
    pub fn set_headers(&mut self, headers: Vec<(String, String)>) {
        self.extra_headers = headers;
    }

    /// `GET path`.
    pub fn get(&mut self, path: &str) -> io::Result<HttpResponse> {
        self.request("GET", path, None, b"")
    }

    /// A request with a JSON body.
    pub fn send_json(
        &mut self,
        method: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> io::Result<HttpResponse> {
        let bytes = serde_json::to_vec(body).map_err(io::Error::other)?;
        self.request(method, path, Some("application/json"), &bytes)
    }

    /// A request with a fully buffered body. A connection the server closed
    /// while idle is re-opened once.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> io::Result<HttpResponse> {
        let reused = self.conn.is_some();
        match self.try_request(method, path, content_type, body) {
            Err(e) if reused && is_stale(&e) => {
                self.conn = None;
                self.try_request(method, path, content_type, body)
            }
            other => other,
        }
    }

    fn try_request(
        &mut self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> io::Result<HttpResponse> {
        let head = self.head(method, path, content_type, Some(body.len() as u64));
        let conn = self.connection()?;
        let w = conn.get_mut();
        w.write_all(head.as_bytes())?;
        w.write_all(body)?;
        w.flush()?;
        self.read_response()
    }

    /// A request whose body is streamed from `body` with chunked encoding;
    /// `progress` is called with the bytes sent so far.
    ///
    /// The head goes first with `Expect: 100-continue`, so a server that
    /// refuses the request (a missing token, say) answers before any of the
    /// body is sent; one that says nothing within [`CONTINUE_WAIT`] gets the
    /// body anyway. A server that answers and closes while the body is
    /// being sent has its answer returned, not the broken pipe.
    pub fn request_streaming(
        &mut self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &mut dyn Read,
        progress: &mut dyn FnMut(u64),
    ) -> io::Result<HttpResponse> {
        self.conn = None;
        let mut head = self.head(method, path, Some(content_type), None);
        head.insert_str(head.len() - 2, "Expect: 100-continue\r\n");
        let conn = self.connection()?;
        conn.get_mut().write_all(head.as_bytes())?;
        if let Some(refused) = self.await_continue()? {
            return Ok(refused);
        }
        let sent = self.send_chunked(body, progress);
        match sent {
            Ok(()) => self.read_response(),
            // The server may have answered before it stopped reading.
            Err(e) => self.read_response().map_err(|_| e),
        }
    }

    fn send_chunked(
        &mut self,
        body: &mut dyn Read,
        progress: &mut dyn FnMut(u64),
    ) -> io::Result<()> {
        let w = self.connection()?.get_mut();
        let mut buf = vec![0u8; 256 * 1024];
        let mut sent = 0u64;
        loop {
            let n = body.read(&mut buf)?;
            if n == 0 {
                break;
            }
            write!(w, "{n:x}\r\n")?;
            w.write_all(&buf[..n])?;
            w.write_all(b"\r\n")?;
            sent += n as u64;
            progress(sent);
        }
        w.write_all(b"0\r\n\r\n")?;
        w.flush()
    }

    /// After a head sent with `Expect: 100-continue`: `None` to send the
    /// body (the server said continue, or nothing in time), or the
    /// server's final answer.
    fn await_continue(&mut self) -> io::Result<Option<HttpResponse>> {
        let timeout = self.timeout;
        let conn = self.connection()?;
        conn.get_ref().set_read_timeout(Some(CONTINUE_WAIT))?;
        let ready = match conn.fill_buf() {
            Ok(b) => Ok(!b.is_empty()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        };
        conn.get_ref().set_read_timeout(Some(timeout))?;
        if !ready? {
            return Ok(None);
        }
        let answer = self.read_response()?;
        if answer.status == 100 {
            return Ok(None);
        }
        // Refused before the body: the connection is not reused.
        self.conn = None;
        Ok(Some(answer))
    }

    fn head(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        len: Option<u64>,
    ) -> String {
        let mut h = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        if let Some(t) = &self.token {
            h.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        for (k, v) in &self.extra_headers {
            h.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(ct) = content_type {
            h.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        match len {
            Some(n) => h.push_str(&format!("Content-Length: {n}\r\n")),
            None => h.push_str("Transfer-Encoding: chunked\r\n"),
        }
        h.push_str("\r\n");
        h
    }

    fn connection(&mut self) -> io::Result<&mut BufReader<TcpStream>> {
        if self.conn.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, self.timeout)?;
            s.set_read_timeout(Some(self.timeout))?;
            s.set_write_timeout(Some(self.timeout))?;
            s.set_nodelay(true)?;
            self.conn = Some(BufReader::with_capacity(64 * 1024, s));
        }
        Ok(self.conn.as_mut().expect("connection was just set"))
    }

    fn read_response(&mut self) -> io::Result<HttpResponse> {
        let result = read_response(self.conn.as_mut().expect("request wrote on a connection"));
        match &result {
            Ok((_, keep)) if *keep => {}
            _ => self.conn = None,
        }
        result.map(|(r, _)| r)
    }
}

/// How long a streamed request waits for `100 Continue` (or a refusal)
/// before it sends its body anyway.
pub const CONTINUE_WAIT: Duration = Duration::from_secs(2);

fn is_stale(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_owned())
}

/// Reads one response; the flag says whether the connection stays open.
fn read_response(r: &mut BufReader<TcpStream>) -> io::Result<(HttpResponse, bool)> {
    let mut head = Vec::new();
    loop {
        let n = r.read_until(b'\n', &mut head)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before a response",
            ));
        }
        if head.ends_with(b"\r\n\r\n") || head == b"\r\n" {
            break;
        }
        if head.len() > 64 * 1024 {
            return Err(bad("response head too large"));
        }
    }
    let mut hdrs = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut hdrs);
    match resp.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(bad("malformed response head")),
    }
    let status = resp.code.ok_or_else(|| bad("no status"))?;
    let headers: Vec<(String, String)> = resp
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_owned(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let keep = !find("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
    let chunked =
        find("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut line = String::new();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| bad("bad chunk size"))?;
            if body.len() + size > MAX_RESPONSE_BYTES {
                return Err(bad("response too large"));
            }
            if size == 0 {
                let mut end = String::new();
                r.read_line(&mut end)?;
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)?;
        }
    } else if let Some(len) = find("content-length") {
        let len: usize = len.trim().parse().map_err(|_| bad("bad content-length"))?;
        if len > MAX_RESPONSE_BYTES {
            return Err(bad("response too large"));
        }
        body.resize(len, 0);
        r.read_exact(&mut body)?;
    } else if status != 204 && status != 304 && !(100..200).contains(&status) {
        r.take(MAX_RESPONSE_BYTES as u64).read_to_end(&mut body)?;
        return Ok((
            HttpResponse {
                status,
                headers,
                body,
            },
            false,
        ));
    }
    Ok((
        HttpResponse {
            status,
            headers,
            body,
        },
        keep,
    ))
}
