//! The epoll backend: a plain tokio current-thread runtime per shard.

use super::serve::ConnServer;
use super::{NewHandler, ShardStart};

/// Runs one shard until the shards stop serving, then drains its
/// connections.
pub(super) fn run_shard<N: NewHandler>(start: ShardStart<N>) {
    let index = start.index;
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(shard = index, error = %e, "cannot start shard runtime");
            return;
        }
    };
    rt.block_on(serve(start));
}

async fn serve<N: NewHandler>(start: ShardStart<N>) {
    let ShardStart {
        index,
        listener,
        new_handler,
        options,
        mut phase,
        started,
    } = start;
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(shard = index, error = %e, "cannot register listener");
            return;
        }
    };
    let server = ConnServer::new(index, &*new_handler, options, started);
    server
        .accept_loop(
            &mut phase,
            || async {
                let (stream, _peer) = listener.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok(stream)
            },
            |server, stream| {
                tokio::spawn(server.connection(stream));
            },
        )
        .await;
    drop(listener);
    server.drain(&mut phase).await;
}
