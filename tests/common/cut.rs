//! A TCP proxy the test controls: cutting black-holes the link (sockets stay open, bytes
//! stop); healing drops the black-holed connections so clients redial.
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};

/// A TCP proxy whose upstream is set later and which can black-hole everything.
pub struct Cut {
    pub addr: SocketAddr,
    upstream: Arc<Mutex<Option<SocketAddr>>>,
    cut: tokio::sync::watch::Sender<bool>,
}

impl Cut {
    pub async fn new() -> Cut {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let upstream: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let (cut, rx) = tokio::sync::watch::channel(false);
        let up = upstream.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = l.accept().await {
                let Some(target) = *up.lock().unwrap() else { continue };
                let mut rx = rx.clone();
                tokio::spawn(async move {
                    let is_cut = *rx.borrow();
                    if is_cut {
                        // Black hole: hold the socket, forward nothing, until healed.
                        let _ = rx.wait_for(|c| !*c).await.map(|_| ());
                        drop(client);
                        return;
                    }
                    let Ok(server) = TcpStream::connect(target).await else { return };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let pipe = async {
                        tokio::select! {
                            _ = tokio::io::copy(&mut cr, &mut sw) => {}
                            _ = tokio::io::copy(&mut sr, &mut cw) => {}
                        }
                    };
                    let mut rx2 = rx.clone();
                    let cut = async move {
                        let _ = rx2.wait_for(|c| *c).await.map(|_| ());
                    };
                    let was_cut = tokio::select! {
                        _ = pipe => false,
                        _ = cut => true,
                    };
                    if was_cut {
                        // Cut: stop forwarding but keep both sockets open until healed.
                        let _ = rx.wait_for(|c| !*c).await.map(|_| ());
                    }
                });
            }
        });
        Cut { addr, upstream, cut }
    }

    pub fn set_upstream(&self, a: SocketAddr) {
        *self.upstream.lock().unwrap() = Some(a);
    }

    pub fn cut(&self, on: bool) {
        let _ = self.cut.send(on);
    }
}

/// A proxy in front of the PostgreSQL at `url`, and the same URL through the proxy (so a test
/// can cut the store's link while the node runs).
pub async fn in_front_of_postgres(url: &str) -> (Cut, String) {
    let proxy = Cut::new().await;
    let upstream: SocketAddr = {
        let hostport = url.split('@').nth(1).unwrap().split('/').next().unwrap();
        tokio::net::lookup_host(hostport).await.unwrap().next().unwrap()
    };
    proxy.set_upstream(upstream);
    let through = url
        .replace(&upstream.to_string(), &proxy.addr.to_string())
        .replace(&format!("127.0.0.1:{}", upstream.port()), &proxy.addr.to_string());
    assert!(through.contains(&proxy.addr.to_string()), "{through}");
    (proxy, through)
}
