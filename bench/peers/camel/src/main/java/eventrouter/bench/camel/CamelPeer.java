package eventrouter.bench.camel;

import java.util.HashMap;
import java.util.List;
import java.util.Map;
import org.apache.camel.RuntimeCamelException;
import org.apache.camel.component.platform.http.vertx.VertxPlatformHttpServer;
import org.apache.camel.component.platform.http.vertx.VertxPlatformHttpServerConfiguration;
import org.apache.camel.main.BaseMainSupport;
import org.apache.camel.main.Main;
import org.apache.camel.main.MainListenerSupport;

/**
 * Runs the Apache Camel peer of bench/kafka_e2e.py: Camel Main with
 * {@link EventsToKafkaRoute} behind a Vert.x HTTP server on 127.0.0.1.
 *
 * <pre>
 * java -cp 'libs/*' eventrouter.bench.camel.CamelPeer \
 *     --port 8080 --bootstrap 127.0.0.1:9092 --topic events [--parallel]
 * </pre>
 *
 * <p>{@code --parallel} turns on the splitter's parallel processing, as
 * {@link EventsToKafkaRoute} describes. Without it the splitter sends the
 * events of a request one after the other.
 *
 * <p>Runs until SIGTERM or SIGINT, then stops the route gracefully.
 */
public final class CamelPeer {

    static final String HOST = "127.0.0.1";

    private static final String USAGE =
            "Usage: CamelPeer --port PORT --bootstrap HOST:PORT[,HOST:PORT...] --topic TOPIC"
                    + " [--parallel]";
    /** Options that take a value, all required. */
    private static final List<String> OPTIONS = List.of("--port", "--bootstrap", "--topic");
    /** The only option without a value. */
    static final String PARALLEL = "--parallel";

    private CamelPeer() {
    }

    public static void main(String[] args) throws Exception {
        Map<String, String> options;
        int port;
        try {
            options = parseOptions(args);
            port = parsePort(options.get("--port"));
        } catch (IllegalArgumentException e) {
            System.err.println("camel-peer: " + e.getMessage());
            System.err.println(USAGE);
            System.exit(2);
            return;
        }

        // camel-platform-http-main would start this server from camel.server.*
        // properties, but its 4.22.0 jar did not resolve from Maven Central, so
        // the peer adds the server as a service, as camel-platform-http-vertx
        // documents for standalone use.
        VertxPlatformHttpServerConfiguration http = new VertxPlatformHttpServerConfiguration();
        http.setBindHost(HOST);
        http.setBindPort(port);

        Main main = new Main();
        main.addInitialProperty("kafka.bootstrap", options.get("--bootstrap"));
        main.addInitialProperty("kafka.topic", options.get("--topic"));
        main.configure().withName("camel-peer");
        main.configure().addRoutesBuilder(new EventsToKafkaRoute(options.containsKey(PARALLEL)));
        main.addMainListener(new MainListenerSupport() {
            @Override
            public void beforeStart(BaseMainSupport support) {
                try {
                    support.getCamelContext().addService(new VertxPlatformHttpServer(http));
                } catch (Exception e) {
                    throw RuntimeCamelException.wrapRuntimeException(e);
                }
            }
        });
        main.run();
    }

    /**
     * Parses {@code --name value} pairs and the {@code --parallel} flag, and
     * rejects unknown or missing options. The flag, when given, maps to an
     * empty string.
     */
    static Map<String, String> parseOptions(String[] args) {
        Map<String, String> options = new HashMap<>();
        int i = 0;
        while (i < args.length) {
            String name = args[i];
            if (name.equals(PARALLEL)) {
                options.put(name, "");
                i += 1;
                continue;
            }
            if (!OPTIONS.contains(name)) {
                throw new IllegalArgumentException("unknown option '" + name + "'");
            }
            if (i + 1 >= args.length || args[i + 1].isBlank()) {
                throw new IllegalArgumentException("option " + name + " requires a value");
            }
            options.put(name, args[i + 1]);
            i += 2;
        }
        for (String name : OPTIONS) {
            if (!options.containsKey(name)) {
                throw new IllegalArgumentException("missing option " + name);
            }
        }
        return options;
    }

    static int parsePort(String value) {
        try {
            int port = Integer.parseInt(value);
            if (port >= 1 && port <= 65535) {
                return port;
            }
        } catch (NumberFormatException e) {
            // Reported below with the value.
        }
        throw new IllegalArgumentException("invalid --port '" + value + "': expected 1-65535");
    }
}
